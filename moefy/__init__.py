"""moefy: turn dense PyTorch models into sparse Mixture-of-Experts models and run them fast."""

from moefy import runtime
from moefy.layers import MoE

__version__ = "0.1.0"

__all__ = ["MoE", "runtime", "__version__"]
