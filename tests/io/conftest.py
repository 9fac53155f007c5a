import pytest

import moefy
from tests.io.models import CONVERSIONS


@pytest.fixture
def saved(tmp_path):
    """A folder holding ``moefy.save`` of a LLaMA upcycled with a sigmoid router."""
    moefy.save(CONVERSIONS["upcycle-sigmoid"](), tmp_path)
    return tmp_path
