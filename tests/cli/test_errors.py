"""``moefy.cli.errors``: the library's messages read in the command line's words."""

from moefy.cli.errors import in_flags


def test_messages_speak_in_flags():
    assert in_flags("mixtral can hold this model: moefy.export_hf(model, directory, "
                    "architecture='mixtral')") == (
        "mixtral can hold this model: moefy export-hf OUT --architecture mixtral -o DIR")
    assert in_flags("setting num_experts must be a positive int") == (
        "--experts must be a positive int")
