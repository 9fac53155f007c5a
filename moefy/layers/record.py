"""The conversion record a converted layer keeps: how it was made from a dense FFN.

    convert: build (method, router, compensation, what the fits measured) → verify (outcome)
      → distil (steps, losses) ⇒ ``layer.conversion``: one frozen ``ConversionRecord``
    read by ``moefy.report``, the command line and ``moefy.save`` / ``moefy.load``

A layer built directly (``moefy.MoE(...)``) holds an empty record. The record is also a
read-only mapping of the fields that are set, then the measured numbers, so
``layer.conversion["router_recall"]`` and ``.get("method")`` read either kind.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

_NAMED = ("name", "method", "dense_ffn_size", "router_init", "compensation", "verified",
          "distill")


@dataclass(frozen=True, eq=True)
class ConversionRecord(Mapping):
    """How a layer was converted. Fields left ``None`` were not decided by the conversion
    (e.g. a layer built directly, or an upcycle, which fits no router)."""

    name: str | None = None  # the dense FFN's module path in the original model
    method: str | None = None  # "upcycle" | "split" | "peer"
    dense_ffn_size: int | None = None  # hidden neurons of the dense FFN
    router_init: str | None = None  # split: how the router was set
    compensation: str | None = None  # split: what stands in for the skipped experts
    verified: str | None = None  # what the verification checked, in words
    distill: Mapping[str, Any] | None = None  # convert(minutes=): steps, seconds, losses, why
    measured: Mapping[str, Any] = field(default_factory=dict)  # what the fits measured

    def __post_init__(self):
        object.__setattr__(self, "measured", dict(self.measured))
        if self.distill is not None:
            object.__setattr__(self, "distill", dict(self.distill))
        clash = sorted(set(self.measured) & set(_NAMED))
        if clash:
            raise ValueError(f"ConversionRecord: measured values named like fields: {clash}")

    # a read-only mapping: the named fields that are set, then what was measured
    def __getitem__(self, key: str):
        if key in _NAMED:
            value = getattr(self, key)
            if value is not None:
                return value
            raise KeyError(key)
        return self.measured[key]

    def __iter__(self) -> Iterator[str]:
        yield from (k for k in _NAMED if getattr(self, k) is not None)
        yield from self.measured

    def __len__(self) -> int:
        return sum(1 for _ in self)

    __hash__ = None  # holds dicts

    def with_(self, **changes) -> ConversionRecord:
        """A copy with ``changes``: named fields replaced, any other key added to
        ``measured``."""
        named = {k: v for k, v in changes.items() if k in _NAMED}
        measured = {**self.measured, **{k: v for k, v in changes.items() if k not in _NAMED}}
        return dataclasses.replace(self, **named, measured=measured)

    @classmethod
    def of(cls, value: Mapping | None) -> ConversionRecord:
        """``value`` as a record: a record as it is, a mapping (e.g. a saved plan's entry)
        by its keys, None as the empty record."""
        if value is None:
            return cls()
        if isinstance(value, ConversionRecord):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"a conversion record must be a mapping, got "
                            f"{type(value).__name__}")
        return cls().with_(**dict(value))

    def to_json(self) -> dict:
        """A JSON-serialisable dict: tensors as lists, non-finite floats as None; what JSON
        cannot say is left out (the record is descriptive only)."""
        return jsonable(dict(self))


_SKIP = object()


def jsonable(value):
    """``value`` as JSON: tensors as lists, non-finite floats as None; what JSON cannot say is
    left out (descriptive values only)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, Mapping):
        out = {str(k): jsonable(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _SKIP}
    if isinstance(value, (list, tuple)):
        return [v for v in (jsonable(v) for v in value) if v is not _SKIP]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return jsonable(value.item())
    return _SKIP
