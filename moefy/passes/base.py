"""The pass protocol: one job per pass, an explicit ordered pipeline, results with counts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from moefy.errors import MoefyError

_log = logging.getLogger("moefy.convert")


@dataclass
class PassResult:
    """``modified``: the pass changed the model (analysis passes never do); ``counts``: what
    it found or did, logged at INFO on the ``moefy.convert`` logger after every pass."""

    modified: bool
    counts: dict[str, int | float] = field(default_factory=dict)

    def describe(self) -> str:
        counts = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in self.counts.items())
        return ("changed the model" if self.modified else "no change") + (
            f" ({counts})" if counts else "")


class Pass:
    """A step of the conversion pipeline. Subclasses implement ``call(state)``.

    ``__call__`` runs it, logs its result and names the pass in any moefy error it
    raises."""

    def call(self, state: Any) -> PassResult:
        raise NotImplementedError

    def __call__(self, state: Any) -> PassResult:
        try:
            result = self.call(state)
        except MoefyError as exc:
            if not getattr(exc, "pass_name", None):
                exc.pass_name = type(self).__name__
                exc.args = (f"[{exc.pass_name}] {exc}",)
            raise
        _log.info("%s: %s", type(self).__name__, result.describe())
        return result
