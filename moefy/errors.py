"""Typed errors. Each says what was wrong and what to do."""


class MoefyError(Exception):
    """Base class of moefy's errors."""


class TraceError(MoefyError):
    """The model could not be traced into a graph."""


class NoFFNFoundError(MoefyError):
    """No feed-forward block matched; the message lists what was examined and why."""


class AlreadyConvertedError(MoefyError):
    """The model already holds moefy MoE layers."""


class ConversionError(MoefyError):
    """A matched FFN cannot be converted with the requested settings."""


class VerificationError(MoefyError):
    """The converted model does not reproduce the dense model where it must."""
