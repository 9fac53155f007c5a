"""The ``moefy`` command: convert a dense model into experts, then inspect, export and time it.

    moefy convert MODEL -o OUT       dense model ──convert (+ calibration, distillation)──▶ OUT
    moefy report OUT                 OUT ──load──▶ one row per MoE layer (load, error with data)
    moefy export-onnx OUT -o F.onnx  OUT ──load──▶ ONNX file, validated in ONNX Runtime
    moefy export-hf OUT -o DIR       OUT ──load──▶ a Hugging Face MoE checkpoint
    moefy bench OUT                  dense vs MoE, PyTorch and ONNX Runtime, one table

Every command is a thin layer over the Python API (``moefy.convert``, ``save``, ``load``,
``report``, ``export_onnx``, ``export_hf``, ``runtime.Session``, ``moefy.evaluate``). Errors
are one line on stderr (``moefy: error: ...``; exit 1, 2 for a usage error, 130 on Ctrl-C)
unless ``--verbose``.

This package holds ``main`` (parse, run the command, turn a failure into its line); the
grammar is in ``parser``, each command in its own module (``convert``, ``report``,
``export_onnx``, ``export_hf``, ``bench``), what they share in ``checkpoint`` (paths, loading),
``inputs`` (text to batches, example inputs), ``console`` and ``errors``. Only the module of the
command that runs is imported, so ``moefy --help`` loads neither torch nor moefy's models.
"""

from __future__ import annotations

import importlib
import sys
import traceback

from moefy.cli.console import Console, quiet_libraries
from moefy.cli.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, CommandUsageError, message_of
from moefy.cli.parser import build_parser

# command → "module:function" that runs it, imported only when it runs
COMMANDS = {
    "convert": "moefy.cli.convert:cmd_convert",
    "report": "moefy.cli.report:cmd_report",
    "export-onnx": "moefy.cli.export_onnx:cmd_export_onnx",
    "export-hf": "moefy.cli.export_hf:cmd_export_hf",
    "bench": "moefy.cli.bench:cmd_bench",
}


def command_function(command: str):
    """The function that runs ``command`` (``run(args, console)``); imports its module."""
    module, _, function = COMMANDS[command].partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    """Run the ``moefy`` command; returns its exit status (0 on success)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits with 2
    args.argv = argv  # what convert records of how the checkpoint was made
    console = Console(args.verbose)
    try:
        # the command's module first: importing torch sets its loggers' levels, which
        # quiet_libraries then lowers
        run = command_function(args.command)
        with quiet_libraries(args.verbose):
            run(args, console)
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        print("moefy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # every failure becomes one line; --verbose shows where
        if args.verbose:
            traceback.print_exc()
        print(f"moefy: error: {message_of(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, CommandUsageError) else EXIT_ERROR
    return 0
