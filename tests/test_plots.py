"""Run reports (wmtp/training/plots.py, scripts/plot_run.py) on hand-written run folders of the four
recipes, with the keys each recipe logs, and on a real tiny baseline run with validation."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TEST_ENV, load_recipe, recipe_args
from wmtp.layout import REPORT_NAME
from wmtp.logs import setup_logging
from wmtp.training.plots import DPI, NCOLS, PANEL_SIZE, build_report, maybe_plot, panel_lines, plot_run

pytest.importorskip("matplotlib")

N_STEPS, VAL_STEPS, HEADS = 10, (5, 10), range(4)
MECHANICS = {"learning rate": {"lr"}, "throughput": {"tokens_per_s"}, "grad norm": {"grad_norm"}}
CONFIGS = {
    "baseline": "[training]\nmax_steps = 10\n",
    "verifiable": '[critic]\nloss = "mse"\n[td]\nw_min = 0.1\nw_max = 3.0\n',
    "rho1": "[rho1]\nratio = 0.6\n",
    "critic": '[critic]\nloss = "mse"\n',
}


def heads(*bases: str) -> set[str]:
    return {f"{b}/head_{k}" for b in bases for k in HEADS}


def with_val(keys: set[str]) -> set[str]:
    return keys | {f"val/{k}" for k in keys}


TD_STATS = {f"{d}/{s}" for d in ("td", "weight") for s in ("mean", "std", "min", "max")}
SITE = ("first_diff", "other", "below_median", "auroc", "rows", "first_diff_correct")
WEIGHT_DIAG = {f"diag/weight/{s}" for s in SITE} | {"diag/weight/correct", "diag/weight/incorrect"}
TD_DIAG = {f"diag/td/{s}" for s in SITE}
RHO1_DIAG = {f"diag/{q}/{s}" for q in ("selected", "excess") for s in ("first_diff", "other")}
"""wmtp.weighting.diagnostics.TokenDiagnostics: what each recipe logs of its first differing tokens."""
"""wmtp.weighting.td.td_stats: the per-step distribution of the TD errors and token weights."""
# What each recipe's train_step / validate logs (recipes/full_finetune_*.py), and the panels a report of
# it must hold: {title: the keys drawn as lines}.
TRAIN_KEYS = {
    "baseline": {"loss"} | heads("loss", "pairs"),
    "verifiable": {
        "loss",
        "policy_loss",
        "value_loss",
        "weight/clipped_share",
        "weight/clipped_low_share",
        "weight/clipped_high_share",
    }
    | TD_STATS
    | WEIGHT_DIAG
    | TD_DIAG
    | heads("loss", "ce", "weight"),
    "rho1": {"loss"} | heads("loss", "selected", "excess") | RHO1_DIAG,
    "critic": {"value_loss", "value/correct", "value/incorrect", "auroc", "rows"} | TD_DIAG,
}
VAL_KEYS = {
    "baseline": {"val/loss"} | heads("val/loss"),
    "verifiable": {"val/loss", "val/policy_loss", "val/ce", "val/weight", "val/value_loss"}
    | heads("val/policy_loss", "val/ce", "val/weight")
    | {f"val/{k}" for k in WEIGHT_DIAG | TD_DIAG},
    "rho1": {"val/loss", "val/ce", "val/excess", "val/selected"}
    | heads("val/loss", "val/ce", "val/excess", "val/selected")
    | {f"val/{k}" for k in RHO1_DIAG},
    "critic": {"val/value_loss", "val/value/correct", "val/value/incorrect", "val/auroc", "val/rows"}
    | {f"val/{k}" for k in TD_DIAG},
}
TD_PANELS = {
    "critic TD error at the first differing token": with_val(
        {"diag/td/first_diff", "diag/td/other", "diag/td/first_diff_correct"}
    ),
}
PANELS = {
    "baseline": {"loss": {"loss", "val/loss"}, "loss per head": heads("loss", "val/loss")},
    "verifiable": {
        "loss": {"loss", "policy_loss", "val/loss", "val/policy_loss"},
        "value loss": {"value_loss", "val/value_loss"},
        "loss per head": heads("loss", "val/policy_loss"),
        "unweighted CE per head": heads("ce", "val/ce") | {"val/ce"},
        "token weights": {"weight/mean"},
        "TD errors": {"td/mean"},
        "clipped weight share": {"weight/clipped_share", "weight/clipped_low_share", "weight/clipped_high_share"},
        "mean weight per head": heads("weight", "val/weight") | {"val/weight"},
        "weights at the first differing token": with_val(
            {"diag/weight/first_diff", "diag/weight/other", "diag/weight/first_diff_correct"}
        ),
        "weights: correct vs incorrect rows": with_val({"diag/weight/correct", "diag/weight/incorrect"}),
        **TD_PANELS,
        "first differing token within its row": with_val(
            {"diag/weight/below_median", "diag/weight/auroc", "diag/td/below_median", "diag/td/auroc"}
        ),
    },
    "rho1": {
        "loss": {"loss", "val/loss"},
        "loss per head": heads("loss", "val/loss"),
        "unweighted CE per head": heads("val/ce") | {"val/ce"},
        "Rho-1 selected fraction per head": heads("selected", "val/selected") | {"val/selected"},
        "Rho-1 excess per head": heads("excess", "val/excess") | {"val/excess"},
        "Rho-1 selection at the first differing token": with_val({"diag/selected/first_diff", "diag/selected/other"}),
        "Rho-1 excess at the first differing token": with_val({"diag/excess/first_diff", "diag/excess/other"}),
    },
    "critic": {
        "value loss": {"value_loss", "val/value_loss"},
        "critic value: correct vs incorrect": {
            "value/correct",
            "value/incorrect",
            "val/value/correct",
            "val/value/incorrect",
        },
        "critic AUROC": {"auroc", "val/auroc"},
        **TD_PANELS,
        "first differing token within its row": with_val({"diag/td/below_median", "diag/td/auroc"}),
    },
}
NOT_DRAWN = (
    {"rows", "val/rows", "step_time_s", "tflops_per_s", "tokens", "flops"}
    | heads("pairs")
    | with_val({"diag/weight/rows", "diag/td/rows"})
)
"""Counts and step mechanics that are logged but not curves of the report."""
BANDS = {k for k in TD_STATS if not k.endswith("/mean")}
"""Drawn as the bands of the distribution panels, not as lines."""


def value(key: str, step: int) -> float:
    """A known value per (key, step): distinct per key, so a line's data says which key it drew."""
    return (sum(map(ord, key)) % 97) / 10 + step / 100


def write_run(folder: Path, recipe: str, *, steps: int = N_STEPS, val_steps=VAL_STEPS, extra_rows=()) -> Path:
    """config.toml with the recipe's sections and metrics.jsonl as the recipe writes it: a data/ row at
    step 0, a training row per step (+ step mechanics), a val/ row at each of val_steps."""
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(CONFIGS[recipe])
    rows = [{"step": 0, "time": 1.0, "data/rows": 240, "data/skipped_bad": 0}]
    train = TRAIN_KEYS[recipe] | {"lr", "grad_norm", "tokens_per_s", "step_time_s", "tflops_per_s", "tokens", "flops"}
    for step in range(1, steps + 1):
        rows.append({"step": step, "time": 1.0 + step, **{k: value(k, step) for k in sorted(train)}})
        if step in val_steps:
            rows.append({"step": step, "time": 1.5 + step, **{k: value(k, step) for k in sorted(VAL_KEYS[recipe])}})
    rows += extra_rows
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def lines_by_key(fig, title: str) -> dict[str, object]:
    ax = next(ax for ax in fig.axes if ax.get_title() == title)
    return {ln.get_gid().split(":", 1)[1]: ln for ln in ax.get_lines() if ln.get_gid()}


@pytest.mark.parametrize("recipe", list(PANELS))
def test_each_recipe_gets_its_panels_with_the_keys_it_logs(tmp_path, recipe):
    run = write_run(tmp_path / recipe, recipe)
    path = plot_run(run)
    assert path == run / REPORT_NAME
    want = {**PANELS[recipe], **MECHANICS}
    n_rows = math.ceil(len(want) / NCOLS)
    assert png_size(path) == (
        round(PANEL_SIZE[0] * min(NCOLS, len(want)) * DPI),
        round((PANEL_SIZE[1] * n_rows + 0.7) * DPI),
    )

    fig = build_report([run])
    lines = panel_lines(fig)
    assert list(lines)[-3:] == list(MECHANICS)  # report order: the recipe's panels, then the mechanics
    assert {title: {k.split(":", 1)[1] for k in drawn} for title, drawn in lines.items()} == want
    assert all(k.startswith(f"{recipe}:") for drawn in lines.values() for k in drawn)
    # Every logged curve is drawn: training keys at every step, held-out ones at the validation steps.
    drawn = {k.split(":", 1)[1]: n for d in lines.values() for k, n in d.items()}
    assert set(drawn) | NOT_DRAWN | BANDS >= TRAIN_KEYS[recipe] | VAL_KEYS[recipe]
    for key, n in drawn.items():
        assert n == (len(VAL_STEPS) if key.startswith("val/") else N_STEPS), key
    # The data are the logged values (no smoothing under SMOOTH_MIN_POINTS points).
    title = next(iter(PANELS[recipe]))
    for key, line in lines_by_key(fig, title).items():
        steps = VAL_STEPS if key.startswith("val/") else range(1, N_STEPS + 1)
        assert list(line.get_xdata()) == list(steps)
        assert list(line.get_ydata()) == pytest.approx([value(key, s) for s in steps])
    assert fig.get_suptitle() == f"{recipe} ({recipe}, steps 1–{N_STEPS}, 240 train rows)"


def test_distribution_panels_draw_bands_and_config_references(tmp_path):
    fig = build_report([write_run(tmp_path / "v", "verifiable")])
    ax = next(ax for ax in fig.axes if ax.get_title() == "token weights")
    assert len(ax.collections) == 2  # min–max envelope and ±1 std band
    refs = sorted(ln.get_ydata()[0] for ln in ax.get_lines() if not ln.get_gid())
    assert refs == [0.1, 3.0]  # w_min, w_max of [td]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["mean", "±1 std (within min–max)", "min – max", "w_min = 0.1 (config)", "w_max = 3 (config)"]
    rho = build_report([write_run(tmp_path / "r", "rho1")])
    ax = next(ax for ax in rho.axes if ax.get_title() == "Rho-1 selected fraction per head")
    assert [ln.get_ydata()[0] for ln in ax.get_lines() if not ln.get_gid()] == [0.6]


def test_dense_training_curves_are_smoothed_and_held_out_ones_are_not(tmp_path):
    run = write_run(tmp_path / "long", "baseline", steps=80, val_steps=(40, 80))
    fig = build_report([run])
    ax = next(ax for ax in fig.axes if ax.get_title() == "loss")
    raw = [ln for ln in ax.get_lines() if not ln.get_gid()]
    by_key = lines_by_key(fig, "loss")
    assert len(raw) == 1 and list(raw[0].get_ydata()) == pytest.approx([value("loss", s) for s in range(1, 81)])
    assert list(by_key["loss"].get_ydata()) != pytest.approx(list(raw[0].get_ydata()))  # the EMA
    assert list(by_key["val/loss"].get_ydata()) == pytest.approx([value("val/loss", s) for s in (40, 80)])
    assert "EMA" in fig.get_supxlabel()


def test_several_runs_overlay_in_one_figure_a_colour_per_run(tmp_path):
    from matplotlib.colors import to_hex

    a = write_run(tmp_path / "a" / "run", "baseline")
    b = write_run(tmp_path / "b" / "run", "verifiable")
    fig = build_report([a, b])
    lines = panel_lines(fig)
    assert set(lines) == set(PANELS["baseline"]) | set(PANELS["verifiable"]) | set(MECHANICS)
    # Same folder name: the runs are told apart by more of their path.
    assert set(lines["loss per head"]) == (
        {f"a/run:{k}" for k in PANELS["baseline"]["loss per head"]}
        | {f"b/run:{k}" for k in PANELS["verifiable"]["loss per head"]}
    )
    colours = {"a/run": set(), "b/run": set()}
    for ax in fig.axes:
        for ln in ax.get_lines():
            if ln.get_gid():
                colours[ln.get_gid().split(":")[0]].add(to_hex(ln.get_color()))
    assert colours == {"a/run": {to_hex("C0")}, "b/run": {to_hex("C1")}}
    headers = [t.get_text() for t in fig.legends[0].get_texts()]
    assert headers == [
        f"a/run (baseline, steps 1–{N_STEPS}, 240 train rows)",
        f"b/run (verifiable, steps 1–{N_STEPS}, 240 train rows)",
    ]
    ax = next(ax for ax in fig.axes if ax.get_title() == "loss per head")
    assert "CE | TD-weighted CE" == ax.get_ylabel()


def test_non_finite_and_missing_values_leave_points_out(tmp_path):
    bad = [
        {"step": 11, "lr": 1e-4, "loss": float("nan"), "auroc": float("inf"), "note": "text"},
        {"step": 12, "lr": 1e-4, "td/mean": float("nan"), "weight/mean": 0.9},
    ]  # no std/min/max
    run = write_run(tmp_path / "v", "verifiable", extra_rows=bad)
    lines = panel_lines(build_report([run]))
    assert lines["loss"]["v:loss"] == N_STEPS  # NaN dropped
    assert lines["TD errors"]["v:td/mean"] == N_STEPS
    assert lines["token weights"]["v:weight/mean"] == N_STEPS + 1
    assert lines["learning rate"]["v:lr"] == N_STEPS + 2
    assert png_size(plot_run(run))[0] > 0


def test_maybe_plot_returns_the_path_or_none_with_the_reason(tmp_path, capsys, monkeypatch):
    setup_logging()  # as a recipe's entry point does: rank 0's info lines on stdout
    run = write_run(tmp_path / "c", "critic")
    assert maybe_plot(run) == run / REPORT_NAME and png_size(run / REPORT_NAME)
    assert "[plots] report ->" in capsys.readouterr().out

    assert maybe_plot(tmp_path / "nowhere") is None
    assert "no metrics.jsonl" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text('{"step": 0, "data/rows": 3}\n')
    assert maybe_plot(empty) is None
    assert "nothing to plot" in capsys.readouterr().out

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.lines", "matplotlib.patches"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    (run / REPORT_NAME).unlink()
    assert maybe_plot(run) is None and not (run / REPORT_NAME).exists()
    assert "matplotlib not installed" in capsys.readouterr().out


def run_cli(args: list[str], *, shim: str = "", cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """scripts/plot_run.py ARGS; with `shim`, that code runs first in the same interpreter."""
    script = str(ROOT / "scripts" / "plot_run.py")
    cmd = (
        [script]
        if not shim
        else [
            "-c",
            f"import runpy, sys; {shim}; sys.argv[0] = {script!r}; runpy.run_path(sys.argv[0], run_name='__main__')",
        ]
    )
    return subprocess.run(
        [sys.executable, *cmd, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **TEST_ENV},
        timeout=120,
    )


def test_cli_one_run_several_runs_and_without_matplotlib(tmp_path):
    one = write_run(tmp_path / "one", "rho1")
    proc = run_cli([str(one)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(one / REPORT_NAME) and png_size(one / REPORT_NAME)

    two = write_run(tmp_path / "two", "baseline")
    proc = run_cli([str(one), str(two)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "runs_report.png"
    wide, _ = png_size(tmp_path / "runs_report.png")
    assert wide == round(PANEL_SIZE[0] * NCOLS * DPI)

    proc = run_cli([str(one), str(tmp_path / "missing")])
    assert proc.returncode == 2 and "no metrics.jsonl in: " in proc.stderr

    proc = run_cli([str(one), "--out", str(tmp_path / "x.png")], shim="sys.modules['matplotlib'] = None")
    assert proc.returncode == 1 and not (tmp_path / "x.png").exists()
    assert "error: run reports need matplotlib" in proc.stderr and "pip install 'wmtp[plots]'" in proc.stderr


def test_real_baseline_run_with_validation_writes_its_report(tiny, tmp_path):
    out = tmp_path / "run"
    load_recipe("full_finetune_baseline").main(
        recipe_args(
            tiny,
            out,
            "baseline_tiny.toml",
            **{
                "training.max_steps": 4,
                "training.micro_batch_size": 2,
                "validation.path": tiny / "data" / "valid.jsonl",
                "validation.every": 2,
                "validation.max_rows": 8,
                "checkpoint.export_final": "false",
                "metrics.report": "true",
            },
        )
    )
    assert png_size(out / REPORT_NAME)  # drawn at the end of the run (metrics.report)
    lines = panel_lines(build_report([out]))
    assert set(lines) == set(PANELS["baseline"]) | set(MECHANICS)
    assert lines["loss"] == {"run:loss": 4, "run:val/loss": 2}
    assert lines["loss per head"] == {
        f"run:{k}": 2 if k.startswith("val/") else 4 for k in PANELS["baseline"]["loss per head"]
    }
