"""moefy: turn dense PyTorch models into sparse Mixture-of-Experts models and run them fast."""

from moefy import distributed, errors, onnx, runtime
from moefy.config import MoEConfig
from moefy.convert import convert
from moefy.distributed.checkpoint import save
from moefy.io.checkpoint import load
from moefy.io.hf import export_hf
from moefy.layers import PEER, MoE
from moefy.onnx import export_onnx
from moefy.passes.distill import aux_loss, distill, freeze
from moefy.report import report
from moefy.version import __version__

__all__ = ["MoE", "MoEConfig", "PEER", "aux_loss", "convert", "distill", "distributed", "errors",
           "export_hf", "export_onnx", "freeze", "load", "onnx", "report", "runtime", "save",
           "__version__"]
