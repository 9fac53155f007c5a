"""moefy: turn dense PyTorch models into sparse Mixture-of-Experts models and run them fast."""

from moefy import runtime
from moefy.config import MoEConfig
from moefy.convert import convert, report
from moefy.layers import MoE

__version__ = "0.1.0"

__all__ = ["MoE", "MoEConfig", "convert", "report", "runtime", "__version__"]
