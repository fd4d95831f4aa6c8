"""One rank-aware logging path: rank 0 prints info, every rank prints warnings and errors."""

import subprocess
import sys

import pytest

PROBE = """
import logging
from wmtp.logs import get_logger, setup_logging
setup_logging()
get_logger("recipe").info("[data] 12 rows")
logging.getLogger("wmtp.training.run").warning("[s3] bucket unreachable")
get_logger("recipe").error("error: bad key")
logging.getLogger("somebody.else").warning("not ours")
"""


def _run(rank: int, world_size: int) -> tuple[list[str], list[str]]:
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return done.stdout.splitlines(), done.stderr.splitlines()


def test_single_process_prints_bare_lines():
    out, err = _run(0, 1)
    assert out == ["[data] 12 rows"]
    # Loggers outside wmtp keep Python's defaults (the last-resort handler prints warnings).
    assert err == ["[s3] bucket unreachable", "error: bad key", "not ours"]


@pytest.mark.parametrize("rank", [0, 1])
def test_ranks_under_torchrun(rank):
    out, err = _run(rank, 2)
    assert out == (["[data] 12 rows"] if rank == 0 else [])
    tag = f"[rank {rank}] " if rank > 0 else ""  # rank 0 is the run's voice: bare lines
    assert err == [f"{tag}[s3] bucket unreachable", f"{tag}error: bad key", "not ours"]


def test_setup_twice_prints_once():
    probe = PROBE.replace("setup_logging()", "setup_logging()\nsetup_logging()")
    done = subprocess.run(
        [sys.executable, "-c", probe], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines() == ["[data] 12 rows"]
