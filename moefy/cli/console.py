"""What the ``moefy`` command writes besides its results: status lines and progress bars on
stderr (``Console``), and libraries kept quiet unless ``--verbose`` (``quiet_libraries``).
Results go to stdout. Imports nothing heavy: tqdm and transformers load when first used."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings

from moefy.errors import first_line


class Console:
    """Status lines and progress bars on stderr, shown on a terminal or with --verbose (so a
    failing command run from a script prints exactly one line there); results go to stdout."""

    def __init__(self, verbose: bool):
        self.live = verbose or sys.stderr.isatty()

    def status(self, message: str) -> None:
        if self.live:
            print(f"moefy: {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def libraries_quiet(self):
        """Off a terminal, hide what libraries write to stderr meanwhile: their own progress
        bars (transformers' GGUF de-quantising uses a bare tqdm that no setting turns off)
        would be the lines around a one-line error."""
        if self.live:
            yield
            return
        with contextlib.redirect_stderr(io.StringIO()):
            yield

    def bar(self, what: str, total: int | None = None, unit: str = "it"):
        from tqdm import tqdm

        return tqdm(desc=f"moefy {what}", total=total, unit=unit, file=sys.stderr,
                    disable=not self.live, dynamic_ncols=True)


@contextlib.contextmanager
def quiet_libraries(verbose: bool):
    """Without --verbose: library warnings as one line each, no transformers progress bars or
    info messages (they would bury the result and the one-line error)."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        yield
        return
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"moefy: warning: {first_line(Warning(message))}", file=sys.stderr)

    # torch.onnx's exporter logs what it skips (torchvision ops) at WARNING
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        # libraries' deprecation notices are for their callers' developers, not for users
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.showwarning = one_line
        yield
