"""The pass protocol: one job per pass, an explicit ordered pipeline, results with counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moefy.errors import MoefyError


@dataclass
class PassResult:
    modified: bool
    counts: dict[str, int] = field(default_factory=dict)


class Pass:
    """A step of the conversion pipeline. Subclasses implement ``call(state)``.

    ``__call__`` runs it and names the pass in any moefy error it raises."""

    def call(self, state: Any) -> PassResult:
        raise NotImplementedError

    def __call__(self, state: Any) -> PassResult:
        try:
            return self.call(state)
        except MoefyError as exc:
            if not getattr(exc, "pass_name", None):
                exc.pass_name = type(self).__name__
                exc.args = (f"[{exc.pass_name}] {exc}",)
            raise
