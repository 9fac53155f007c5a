"""``moefy.cli.parser``: every command has help with an example of itself, and the parser's
copy of what the library can write agrees with the library."""

from __future__ import annotations

import pytest

from moefy import cli
from moefy.cli.parser import HF_ARCHITECTURES
from tests.cli.helpers import COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: moefy {command}" in text
    assert f"  moefy {command} " in text.split("examples:")[1]  # an example of this command


def test_export_hf_offers_the_architectures_the_library_writes():
    from moefy.io.hf import ARCHITECTURES

    assert HF_ARCHITECTURES == ARCHITECTURES
