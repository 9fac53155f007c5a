"""pyproject.toml: the two ONNX Runtime wheels are alternatives, every dependency is used, and
moefy says which extra to install when ONNX Runtime is missing."""

import re
import sys
from pathlib import Path

import pytest

import moefy
from moefy.errors import MissingDependencyError

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMPORT_NAME = {"onnxruntime-gpu": "onnxruntime"}


def name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_onnxruntime_wheels_are_alternative_extras_not_base_dependencies():
    base = {name(r) for r in PROJECT["dependencies"]}
    extras = {k: {name(r) for r in v} for k, v in PROJECT["optional-dependencies"].items()}
    assert not base & {"onnxruntime", "onnxruntime-gpu"}
    assert "onnxruntime" in extras["cpu"] and "onnxruntime-gpu" in extras["gpu"]
    both = [k for k, v in extras.items() if {"onnxruntime", "onnxruntime-gpu"} <= v]
    assert not both  # no single extra installs the two (they break each other)


def test_every_base_dependency_is_imported_by_moefy():
    source = "\n".join(p.read_text() for p in (ROOT / "moefy").rglob("*.py"))
    for requirement in PROJECT["dependencies"]:
        module = IMPORT_NAME.get(name(requirement), name(requirement)).replace("-", "_")
        assert re.search(rf"^\s*(import|from) {module}\b", source, re.M), requirement


def test_session_without_onnxruntime_names_the_extras(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(MissingDependencyError, match=r"moefy\[cpu\].*moefy\[gpu\]"):
        moefy.runtime.Session(tmp_path / "m.onnx")
