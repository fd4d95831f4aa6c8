"""Benchmark harness shared by `benchmarks/test_bench_*.py`.

Every case runs in a fresh Python process (`benchmarks/worker.py`), so compile caches, thread pools
and the allocator state of one case never flatter or penalise the next. Inside that process:

- timing: `warmup` calls (compilation, lazy initialisation), then at least `repeats` timed calls
  (more for fast cases, until they add up to `min_time_s`); the median is reported. On CUDA
  each call is bracketed by `torch.cuda.synchronize` and timed with CUDA events; on CPU with
  `time.perf_counter`.
- peak memory: one more, untimed call. On CUDA: `torch.cuda.max_memory_allocated` minus the
  memory allocated just before the call. On CPU: the process's peak resident set size (VmHWM,
  reset by writing 5 to /proc/self/clear_refs just before the call) minus its resident size then.
  Before that call glibc's malloc gets a fixed mmap threshold of 64 KiB and is trimmed, so every
  buffer of 64 KiB or more is mapped fresh and unmapped when freed: memory freed by the timed
  calls cannot be silently reused, and the peak is what the operation itself needs (inputs
  excluded, outputs such as gradients included). Timing runs before this, with malloc untouched.
- correctness: the outputs of the memory call are compared with a reference (see each test module);
  a case outside its tolerance fails its test, so a fast but wrong result never passes.

Sizes and repeat counts come from WMTP_BENCH_* environment variables (see `Settings.from_env`).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("worker.py")
CASE_TIMEOUT_S = 600
MAX_REPEATS = 100

# glibc mallopt parameter number of M_MMAP_THRESHOLD (malloc.h).
_M_MMAP_THRESHOLD = -3
_MEASURE_MMAP_THRESHOLD = 64 * 1024


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the benchmark reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass(frozen=True)
class Settings:
    """What to run and how often; every field can be set with the environment variable named."""

    device: str
    """WMTP_BENCH_DEVICE: "cuda" or "cpu" (default: cuda when available)."""
    warmup: int
    """WMTP_BENCH_WARMUP: untimed calls before timing (default 1)."""
    repeats: int
    """WMTP_BENCH_REPEATS: least number of timed calls; the median is reported (default 3 on CPU, 10
    on CUDA)."""
    min_time_s: float
    """WMTP_BENCH_MIN_TIME_S: fast cases repeat (up to MAX_REPEATS calls) until their timed calls add
    up to this, so that millisecond cases get a stable median (default 1)."""
    rows: int
    """WMTP_BENCH_N: positions N of the loss (default 2048)."""
    dim: int
    """WMTP_BENCH_D: hidden size D (default 256)."""
    vocab: int
    """WMTP_BENCH_V: vocabulary V (default 32000)."""
    heads: int
    """WMTP_BENCH_HEADS: number of heads n (default 4)."""
    dtype: str
    """WMTP_BENCH_DTYPE: dtype of the default loss shape (default float32)."""
    big_shape: bool
    """WMTP_BENCH_7B: on CUDA, also run the 7B shape N=8192, D=4096, V=32000, n=4, bf16 (default 1)."""
    td_batch: int
    """WMTP_BENCH_TD_B: rows B of the TD weights (default 64)."""
    td_len: int
    """WMTP_BENCH_TD_L: sequence length L of the TD weights (default 2048)."""
    interpret_budget_s: float
    """WMTP_BENCH_INTERPRET_BUDGET_S: a Triton kernel runs under TRITON_INTERPRET on CPU only if
    its whole case (warm-up, repeats, memory call) is estimated to fit in this (default 20)."""
    results_dir: Path
    """WMTP_BENCH_RESULTS: folder of the JSON results (default benchmarks/results)."""

    @classmethod
    def from_env(cls) -> Settings:
        device = os.environ.get("WMTP_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(
            device=device,
            warmup=_env_int("WMTP_BENCH_WARMUP", 1),
            repeats=_env_int("WMTP_BENCH_REPEATS", 10 if device == "cuda" else 3),
            min_time_s=float(os.environ.get("WMTP_BENCH_MIN_TIME_S", 1)),
            rows=_env_int("WMTP_BENCH_N", 2048),
            dim=_env_int("WMTP_BENCH_D", 256),
            vocab=_env_int("WMTP_BENCH_V", 32000),
            heads=_env_int("WMTP_BENCH_HEADS", 4),
            dtype=os.environ.get("WMTP_BENCH_DTYPE", "float32"),
            big_shape=os.environ.get("WMTP_BENCH_7B", "1") != "0",
            td_batch=_env_int("WMTP_BENCH_TD_B", 64),
            td_len=_env_int("WMTP_BENCH_TD_L", 2048),
            interpret_budget_s=float(os.environ.get("WMTP_BENCH_INTERPRET_BUDGET_S", 20)),
            results_dir=Path(os.environ.get("WMTP_BENCH_RESULTS", ROOT / "benchmarks" / "results")),
        )

    def case_seconds(self, per_call: float) -> float:
        """Time of a case whose calls take `per_call` s: warm-up, timed calls and the memory call."""
        timed = max(self.repeats * per_call, min(self.min_time_s, MAX_REPEATS * per_call))
        return (self.warmup + 1) * per_call + timed


class Unavailable(Exception):
    """A case that cannot run here: a peer that is not installed, needs CUDA, or is too slow.

    `status` is "absent" (not installed / not for this device) or "skipped" (could run, but not
    within the budget); either way it is reported in the table, not as an error.
    """

    def __init__(self, reason: str, status: str = "absent") -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class Case:
    """One benchmark case as built inside its worker process."""

    run: Callable[[], Any]
    """One complete call (forward and backward where there is one); returns what `check` needs."""
    check: Callable[[Any], dict[str, float]] | None = None
    """Relative errors of a call's outputs against the reference, by output name."""
    tolerance: float = 0.0
    """Largest relative error `check` may report."""
    label: str = ""
    """What actually ran (resolved backend, peer implementation), shown beside the case name."""
    flops: float | None = None
    """Floating-point operations of one call, for the achieved FLOP/s."""
    bytes_moved: float | None = None
    """Bytes one call must read and write at least (memory-bound kernels), for the achieved GB/s."""
    prepare: Callable[[], None] | None = None
    """Untimed, before every call: puts back what a call changes (e.g. a training step's weights)."""


@dataclass
class Result:
    """One row of a results table."""

    table: str
    case: str
    status: str = "ok"
    """ok | absent | skipped | wrong (outside tolerance)."""
    label: str = ""
    reason: str = ""
    times_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    peak_extra_bytes: int | None = None
    errors: dict[str, float] = field(default_factory=dict)
    tolerance: float | None = None
    flops: float | None = None
    bytes_moved: float | None = None
    others_cpu_share: float | None = None
    """Share of the host's CPU time used by other processes while the case ran (CPU contention)."""
    role: str = ""
    """"baseline" (the ratios' denominator), "floor" (matmul floor) or empty."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class BenchSession:
    """Results of one pytest session, in the order the cases ran (the `bench` fixture)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.results: list[Result] = []
        self.load_start = os.getloadavg()

    def record(self, result: Result) -> Result:
        self.results.append(result)
        return result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call, the device's queue drained before and after."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _pin_malloc() -> None:
    """Make glibc map every buffer of 64 KiB or more fresh, and hand back what it caches now."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the measurement may then under-count reused memory
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _MEASURE_MMAP_THRESHOLD)
    libc.malloc_trim(0)


def measure_peak(fn: Callable[[], Any], device: torch.device) -> tuple[int | None, Any]:
    """(peak extra bytes of one call of `fn`, its outputs); None where it cannot be measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, out
    try:
        _pin_malloc()
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        before = _proc_status_kib("VmRSS")
    except OSError:  # no Linux procfs: no CPU memory figure
        return None, fn()
    out = fn()
    return (_proc_status_kib("VmHWM") - before) * 1024, out


def estimate_interpreted(probe: Callable[[], Any], scale: float, settings: Settings) -> None:
    """Raise Unavailable("skipped") if a case under TRITON_INTERPRET would not fit the budget.

    `probe` is one call on a 1/`scale` slice of the case's rows (the interpreter's cost is linear
    in the rows); it runs twice, the second is timed.
    """
    probe()
    t0 = time.perf_counter()
    probe()
    per_call = (time.perf_counter() - t0) * scale
    total = settings.case_seconds(per_call)
    if total > settings.interpret_budget_s:
        raise Unavailable(
            f"too slow under TRITON_INTERPRET: ~{per_call:.1f} s per call (probe on 1/{scale:g} of the rows), "
            f"~{total:.0f} s for the case > {settings.interpret_budget_s:g} s budget "
            "(WMTP_BENCH_INTERPRET_BUDGET_S)",
            status="skipped",
        )


def _cpu_busy_s() -> float | None:
    """CPU seconds all processes of the host have used since boot (None without /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_case(
    settings: Settings,
    table: str,
    case: str,
    module: str,
    builder: str,
    params: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    role: str = "",
) -> Result:
    """Run `<module>.<builder>(device=..., settings=..., **params)` in a fresh worker process."""
    with tempfile.TemporaryDirectory(prefix="wmtp-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec = {
            "module": str(Path(module).resolve()),
            "builder": builder,
            "params": params,
            "settings": {**asdict(settings), "results_dir": str(settings.results_dir)},
            "result": str(out_path),
        }
        spec_path.write_text(json.dumps(spec))
        busy0, own0, wall0 = _cpu_busy_s(), _children_cpu_s(), time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(WORKER), str(spec_path)],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=CASE_TIMEOUT_S,
        )
        wall, own = time.perf_counter() - wall0, _children_cpu_s() - own0
        busy1 = _cpu_busy_s()
        if proc.returncode != 0:
            raise AssertionError(
                f"{table} / {case}: worker exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        data = json.loads(out_path.read_text())
    others = None
    if busy0 is not None and busy1 is not None and wall > 0:
        others = max(0.0, (busy1 - busy0) - own) / (wall * (os.cpu_count() or 1))
    return Result(table=table, case=case, role=role, others_cpu_share=others, **data)


def worker_main(spec_path: str) -> None:
    """Body of `benchmarks/worker.py`: build one case, time it, measure it, check it."""
    import importlib.util

    spec = json.loads(Path(spec_path).read_text())
    raw = spec["settings"]
    settings = Settings(**{**raw, "results_dir": Path(raw["results_dir"])})
    device = torch.device(settings.device)
    mod_spec = importlib.util.spec_from_file_location(Path(spec["module"]).stem, spec["module"])
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module  # dataclasses resolve annotations through sys.modules
    mod_spec.loader.exec_module(module)
    out_path = Path(spec["result"])
    try:
        case: Case = getattr(module, spec["builder"])(device=device, settings=settings, **spec["params"])
    except Unavailable as exc:
        out_path.write_text(json.dumps({"status": exc.status, "reason": str(exc)}))
        return
    prepare = case.prepare or (lambda: None)
    for _ in range(settings.warmup):
        prepare()
        case.run()
        sync(device)
    times: list[float] = []
    while len(times) < settings.repeats or (sum(times) < settings.min_time_s and len(times) < MAX_REPEATS):
        prepare()
        times.append(time_call(case.run, device))
    prepare()
    peak, outputs = measure_peak(case.run, device)
    errors = case.check(outputs) if case.check else {}
    wrong = any(not err <= case.tolerance for err in errors.values())  # NaN counts as wrong
    out_path.write_text(
        json.dumps(
            {
                "status": "wrong" if wrong else "ok",
                "label": case.label,
                "times_s": times,
                "median_s": statistics.median(times),
                "peak_extra_bytes": peak,
                "errors": errors,
                "tolerance": case.tolerance,
                "flops": case.flops,
                "bytes_moved": case.bytes_moved,
            }
        )
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom else diff
