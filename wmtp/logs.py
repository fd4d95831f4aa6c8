"""One logging path for the library, the recipes and the scripts, aware of torchrun's ranks.

Every module logs to a logger under ``wmtp`` (``logging.getLogger(__name__)`` in the library,
``get_logger("recipe")`` in a recipe, whose ``__name__`` is ``__main__``). ``setup_logging``, called
once by an entry point, prints rank 0's info lines on stdout and every rank's warnings and errors on
stderr. Rank 0 is the run's voice: its lines are the bare messages. Other ranks' info lines are
dropped (every rank would say the same); their warnings and errors start with ``[rank N]``, so that
a line says where it came from. Without ``setup_logging`` (library use), Python's defaults apply.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

ROOT_LOGGER = "wmtp"


class _Console(logging.StreamHandler):
    """A stream handler on ``sys.stdout`` or ``sys.stderr`` as they are at each line (pytest and
    other tools replace them after the handler is made)."""

    def __init__(self, which: str) -> None:
        self._which = which
        super().__init__()

    @property
    def stream(self):  # noqa: ANN201 - a text stream, as StreamHandler.stream
        return getattr(sys, self._which)

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns one; the property wins
        pass


class _Below(logging.Filter):
    """Passes records under a level (info to stdout; warnings go to stderr instead)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` under ``wmtp`` (``wmtp.recipe`` for "recipe"; library names stay as they are)."""
    return logging.getLogger(name if name == ROOT_LOGGER or name.startswith(ROOT_LOGGER + ".") else f"wmtp.{name}")


def setup_logging(rank: int | None = None, *, level: int = logging.INFO) -> None:
    """Route the ``wmtp`` loggers as the module docstring says. ``rank`` defaults to torchrun's RANK
    (0 without torchrun). Calling it again replaces the handlers."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    root = logging.getLogger(ROOT_LOGGER)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level)
    if rank == 0:
        info = _Console("stdout")
        info.addFilter(_Below(logging.WARNING))
        info.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(info)
    problems = _Console("stderr")
    problems.setLevel(logging.WARNING)
    problems.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if rank > 0 else "%(message)s"))
    root.addHandler(problems)


def exit_with_error(message: str, code: int = 2) -> NoReturn:
    """A command-line error before any work (a bad config key, a missing input): ``error: ...`` on
    stderr, from rank 0 only (every rank reads the same config), and exit ``code``."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
