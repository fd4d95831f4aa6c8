"""Benchmark session: collects every case's result, prints the tables and writes the JSON.

Run with `pytest benchmarks/ -s` (the project's default `pytest` collects `tests/` only). The
tables are printed in the terminal summary; the JSON goes to
`benchmarks/results/<date>-<device>.json` (see harness.Settings for the WMTP_BENCH_* variables).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import BenchSession, Result, Settings, cpu_model

OTHERS_BUSY_WARNING = 0.10
"""Flag a case when other processes used more than this share of the CPU while it ran."""
PEERS = ("torch", "triton", "cut-cross-entropy", "liger-kernel")


_SESSION = pytest.StashKey[BenchSession]()


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture(scope="session")
def bench(pytestconfig: pytest.Config, settings: Settings) -> BenchSession:
    session = BenchSession(settings)
    pytestconfig.stash[_SESSION] = session
    return session


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _derived(rows: list[Result]) -> dict[str, dict[str, float | None]]:
    """Per case: time and memory against the table's baseline, time against its floor, TFLOP/s."""
    base = next((r for r in rows if r.role == "baseline" and r.median_s), None)
    floor = next((r for r in rows if r.role == "floor" and r.median_s), None)
    out = {}
    for r in rows:
        out[r.case] = {
            "time_vs_baseline": _ratio(r.median_s, base.median_s) if base else None,
            "memory_vs_baseline": _ratio(r.peak_extra_bytes, base.peak_extra_bytes) if base else None,
            "time_vs_floor": _ratio(r.median_s, floor.median_s) if floor and r.role != "floor" else None,
            "tflops": r.flops / r.median_s / 1e12 if r.flops and r.median_s else None,
            "gbps": r.bytes_moved / r.median_s / 1e9 if r.bytes_moved and r.median_s else None,
        }
    return out


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.2f} ms"


def _fmt_bytes(b: int | None) -> str:
    return "-" if b is None else f"{b / 1e6:,.1f} MB"


def _fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _note(r: Result) -> str:
    if r.status in ("absent", "skipped"):
        return f"{r.status}: {r.reason}"
    notes = []
    if r.status == "wrong":
        notes.append(f"WRONG: errors {r.errors} > tolerance {r.tolerance:g}")
    if r.others_cpu_share is not None and r.others_cpu_share > OTHERS_BUSY_WARNING:
        notes.append(f"other processes used {r.others_cpu_share:.0%} of the CPU meanwhile")
    return "; ".join(notes)


def _table_lines(name: str, rows: list[Result]) -> list[str]:
    derived = _derived(rows)
    base = next((r.case for r in rows if r.role == "baseline"), None)
    header = [
        "case",
        "ran as",
        "median",
        "peak extra",
        "time/base",
        "mem/base",
        "time/floor",
        "TFLOP/s",
        "GB/s",
        "max rel err",
        "note",
    ]
    body = []
    for r in rows:
        d = derived[r.case]
        err = max(r.errors.values()) if r.errors else None
        body.append(
            [
                r.case,
                r.label,
                _fmt_time(r.median_s),
                _fmt_bytes(r.peak_extra_bytes),
                _fmt_x(d["time_vs_baseline"]),
                _fmt_x(d["memory_vs_baseline"]),
                _fmt_x(d["time_vs_floor"]),
                "-" if d["tflops"] is None else f"{d['tflops']:.3g}",
                "-" if d["gbps"] is None else f"{d['gbps']:.4g}",
                "-" if err is None else f"{err:.1e}",
                _note(r),
            ]
        )
    # The note column is left unpadded: it may be long.
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header) - 1)]
    lines = [f"== {name} (base: {base})"]
    for row in [header] + body:
        lines.append(" | ".join(c.ljust(w) for c, w in zip(row, widths)) + " | " + row[-1])
    return lines


def _device_tag(settings: Settings) -> tuple[str, str]:
    """(file-name tag, human-readable name) of the benchmarked device."""
    if settings.device == "cuda":
        name = torch.cuda.get_device_name()
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), name
    return "cpu", cpu_model()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _write_json(session: BenchSession, tables: dict[str, list[Result]]) -> Path:
    settings = session.settings
    tag, device_name = _device_tag(settings)
    now = dt.datetime.now()
    path = settings.results_dir / f"{now.date().isoformat()}-{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "device": settings.device,
        "device_name": device_name,
        "host": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "versions": {dist: _version(dist) for dist in PEERS},
        "settings": {**vars(settings), "results_dir": str(settings.results_dir)},
        "load_average_start": session.load_start,
        "load_average_end": os.getloadavg(),
        "method": {
            "timing": "median of the timed calls after the warm-up, each case in a fresh process; "
            "CUDA events with synchronize on CUDA, perf_counter on CPU",
            "memory": "CUDA: max_memory_allocated minus allocated before the call; CPU: VmHWM after "
            "resetting it via /proc/self/clear_refs, minus VmRSS before the call, glibc mmap "
            "threshold pinned to 64 KiB and malloc trimmed first",
        },
        "tables": [],
    }
    for name, rows in tables.items():
        derived = _derived(rows)
        doc["tables"].append({"name": name, "rows": [{**r.to_json(), **derived[r.case]} for r in rows]})
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    session = config.stash.get(_SESSION, None)
    if session is None or not session.results:
        return
    tables: dict[str, list[Result]] = {}
    for r in session.results:
        tables.setdefault(r.table, []).append(r)
    terminalreporter.section("benchmarks")
    load = os.getloadavg()
    terminalreporter.write_line(
        f"load average at start {session.load_start[0]:.2f}, at end {load[0]:.2f} "
        f"({os.cpu_count()} CPUs); time/floor: against the three plain matmuls"
    )
    for name, rows in tables.items():
        terminalreporter.write_line("")
        for line in _table_lines(name, rows):
            terminalreporter.write_line(line)
    path = _write_json(session, tables)
    terminalreporter.write_line("")
    terminalreporter.write_line(f"results written to {path}")
