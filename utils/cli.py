"""What every script's entry point shares: expected failures end in one line, bugs keep their traceback.

Each script ends with `sys.exit(run_main(main))`. `run_main` calls `main(argv)` and turns an expected
failure into one line on stderr, `<script>: error: <message>`, and exit status 2 (argparse's status for
bad flags); any other exception is a bug and keeps its traceback. Expected failures are:

- `RunError`: raised by this project for a problem the user can fix (a run folder, a checkpoint, a
  dataset, ImageNet weights, a full disk), with a message that says how;
- `OSError` (missing, unreadable or unwritable files, `PIL.UnidentifiedImageError`, a full disk),
  `ValueError` (bad input values: every option check raises it) and `ImportError` (an optional
  package that is not installed).

`--debug` shows the traceback of an expected failure too. `ArgumentParser` puts `--debug` into every
script's `--help` and reports bad flags in the same one-line form (argparse's default prints the whole
usage first, which for the training scripts is a page).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_EXPECTED = 2
"""Exit status of an expected failure (the status argparse uses for bad flags)."""

EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as a shell reports it."""


class RunError(RuntimeError):
    """A failure the user can fix (data, run folder, checkpoint, weights, disk); the message says how."""


EXPECTED = (RunError, OSError, ValueError, ImportError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) and a `--debug` flag on every top-level parser."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.add_help:  # the scripts' own parsers; helper parsers (add_help=False) stay bare
            self.add_argument("--debug", action=argparse.BooleanOptionalAction, default=False,
                              help="on an error, show the full traceback instead of one line")

    def error(self, message: str):
        self.exit(EXIT_EXPECTED, f"{self.prog}: error: {message} (see --help)\n")


def debug_requested(argv: Sequence[str]) -> bool:
    """True when the last of `--debug` / `--no-debug` in `argv` is `--debug`."""
    flags = [a for a in argv if a in ("--debug", "--no-debug")]
    return bool(flags) and flags[-1] == "--debug"


def one_line(err: BaseException) -> str:
    """The exception's message with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(err).split()) or type(err).__name__


def run_main(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Call a script's `main(argv)` and return its exit status (see the module docstring).

    Args:
        main: the script's `main`, taking the argument list (without the program name).
        argv: the arguments; default `sys.argv[1:]`.
    Returns main's status, 2 after an expected failure, 130 after Ctrl-C.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    script = Path(inspect.unwrap(main).__code__.co_filename).name  # unwrap: demo.main is under torch.no_grad
    try:
        return main(argv)
    except EXPECTED as err:
        if debug_requested(argv):
            raise
        print(f"{script}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_EXPECTED
    except KeyboardInterrupt:
        if debug_requested(argv):
            raise
        print(f"{script}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
