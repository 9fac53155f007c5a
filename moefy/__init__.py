"""moefy: turn dense PyTorch models into sparse Mixture-of-Experts models and run them fast.

``import moefy`` is light: each name of ``__all__`` imports its module (and torch) when first
used, so that ``moefy --help`` answers at once (``moefy.cli`` is a subpackage: importing it
runs this file first).
"""

import importlib
import sys
import types

from moefy.version import __version__

__all__ = ["MoE", "MoEConfig", "NeuronFFN", "PEER", "SparseLinear",
           "aux_loss", "convert", "distill", "distributed", "errors",
           "export_hf", "export_onnx", "freeze", "load", "onnx", "report", "runtime", "save",
           "__version__"]

_SUBPACKAGES = ("distributed", "errors", "onnx", "runtime")
# each public function or class → the module that defines it
_DEFINED_IN = {
    "MoE": "moefy.layers", "MoEConfig": "moefy.config", "PEER": "moefy.layers",
    "NeuronFFN": "moefy.layers", "SparseLinear": "moefy.layers",
    "aux_loss": "moefy.passes.distill", "convert": "moefy.convert",
    "distill": "moefy.passes.distill", "export_hf": "moefy.io.hf", "export_onnx": "moefy.onnx",
    "freeze": "moefy.passes.distill", "load": "moefy.io.checkpoint", "report": "moefy.report",
    "save": "moefy.distributed.checkpoint",
}


class _Package(types.ModuleType):
    """moefy itself, its public names imported on first use. ``moefy.convert`` and
    ``moefy.report`` name functions although modules of the same names exist: importing those
    modules (which binds them here) leaves the names to the functions, as before."""

    def __getattr__(self, name: str):
        if name in _SUBPACKAGES:
            value = importlib.import_module(f"{__name__}.{name}")
        elif name in _DEFINED_IN:
            value = getattr(importlib.import_module(_DEFINED_IN[name]), name)
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        if (name in ("convert", "report") and isinstance(value, types.ModuleType)
                and value.__name__ == f"{__name__}.{name}"):
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted({*super().__dir__(), *__all__})


sys.modules[__name__].__class__ = _Package
