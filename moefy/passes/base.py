"""The pass protocol: one job per pass, an explicit ordered pipeline, results with counts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from moefy.errors import MoefyError

_log = logging.getLogger("moefy.convert")


@dataclass
class PassResult:
    """``modified``: the pass changed what the model computes (analysis passes never do; a
    record written on a layer is counted, not a change); ``counts``: what it found or did,
    logged at INFO on the ``moefy.convert`` logger after every pass."""

    modified: bool
    counts: dict[str, int | float] = field(default_factory=dict)
    output: Any = None  # the stage the pass made (``moefy.passes.stages``), if any

    def describe(self) -> str:
        counts = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in self.counts.items())
        return ("changed the model" if self.modified else "no change") + (
            f" ({counts})" if counts else "")


class Pass:
    """A step of the conversion pipeline. Subclasses implement ``call(request, *stages)``,
    taking the stages named in ``needs`` in that order and returning a ``PassResult`` whose
    ``output`` is the stage they make (or None).

    ``__call__`` runs it, logs its result and names the pass in any moefy error it
    raises."""

    needs: tuple[type, ...] = ()

    def call(self, request: Any, *stages: Any) -> PassResult:
        raise NotImplementedError

    def __call__(self, request: Any, *stages: Any) -> PassResult:
        try:
            result = self.call(request, *stages)
        except MoefyError as exc:
            if not getattr(exc, "pass_name", None):
                exc.pass_name = type(self).__name__
                exc.args = (f"[{exc.pass_name}] {exc}",)
            raise
        _log.info("%s: %s", type(self).__name__, result.describe())
        return result
