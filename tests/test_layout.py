"""The house keeps its shape: no module of moefy imports a private name (``_x``) or a private
module from another module (a name another module needs is public where it lives), and no
module reaches into another's private attributes through an imported module. The floors
themselves are import-linter's layers contract (pyproject.toml, ``make lint``)."""

import ast
from pathlib import Path

import moefy

PACKAGE = Path(moefy.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(source: str, here: str) -> list[str]:
    """``from moefy.x import _y`` / ``import moefy.x._y`` in module ``here`` across modules,
    and ``alias._y`` where ``alias`` is a moefy module it imported."""
    tree = ast.parse(source, here)
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moefy"):
            if any(_private(p) for p in node.module.split(".")):
                found.append(f"{here}: from {node.module} import ...")
            for alias in node.names:
                if node.module != here and _private(alias.name):
                    found.append(f"{here}: from {node.module} import {alias.name}")
                elif not _private(alias.name):
                    modules.add(alias.asname or alias.name)  # maybe a submodule
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("moefy") and any(
                        _private(p) for p in alias.name.split(".")):
                    found.append(f"{here}: import {alias.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr)
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            try:  # only where the name is a moefy module, not a class or function
                target = __import__(f"{_owner(tree, node.value.id)}", fromlist=["x"])
            except ImportError:
                continue
            if getattr(target, "__file__", None) and target.__name__ != here:
                found.append(f"{here}: {node.value.id}.{node.attr}")
    return found


def _owner(tree: ast.Module, name: str) -> str:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moefy"):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return f"{node.module}.{alias.name}"
    return name


def test_no_private_name_crosses_a_module():
    found = [f for path in sorted(PACKAGE.rglob("*.py"))
             for f in private_imports(path.read_text(), _module_name(path))]
    assert found == []


def test_the_check_sees_a_private_import():
    source = ("from moefy.passes.find_ffn import _VIEWS\nfrom moefy.runtime import dispatch\n"
              "from moefy.layers.moe import _uniform_\nx = dispatch._padded_rows\n")
    assert private_imports(source, "moefy.layers.probe") == [
        "moefy.layers.probe: from moefy.passes.find_ffn import _VIEWS",
        "moefy.layers.probe: from moefy.layers.moe import _uniform_",
        "moefy.layers.probe: dispatch._padded_rows"]
    assert private_imports(source, "moefy.layers.moe") == [
        "moefy.layers.moe: from moefy.passes.find_ffn import _VIEWS",
        "moefy.layers.moe: dispatch._padded_rows"]
