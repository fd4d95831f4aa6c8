"""PNG reports of training runs: the curves of metrics.jsonl, one panel per quantity.

    from wmtp.training.plots import maybe_plot, plot_run, plot_runs
    plot_run("outputs/verifiable_tiny")                     # -> outputs/verifiable_tiny/report.png
    plot_runs([run_a, run_b], Path("compare.png"))         # one figure, the runs overlaid

A run folder is a recipe's training.output_dir: `config.toml` tells the recipe (by its sections, as in
scripts/compare_runs.py) and `metrics.jsonl` holds the logged rows. The panels, in this order, each drawn
only when some run logged one of its keys:

  loss            loss, policy loss; value loss (verifiable, critic); loss per head
  verifiable      unweighted CE per head; token weights and TD errors over training; clipped weight share;
                  mean weight per head
  Rho-1           selected fraction per head; excess (CE - reference CE) per head
  critic          mean value on correct vs incorrect rows; AUROC of the last-state value
  token level     where the data knows each row's first differing token from its sibling (diag/*): the
                  weights there against the row's other tokens and on correct vs incorrect rows; the
                  critic's TD error there; the share of rows where it ranks below the row's median and
                  its within-row AUROC; Rho-1's selected share and excess there
  mechanics       learning rate; throughput (tokens/s); grad norm

The held-out twin of a curve (`val/<key>`, logged every validation.every steps) is drawn in the same panel,
with markers, in the colour (one run) or line style (several runs) of its training curve; a held-out mean
over heads (val/ce, val/weight, ...) is one more curve beside the heads. Counts (val/rows, pairs/*, data/*,
diag/*/rows) and evaluate.py's eval/* are not drawn.

metrics.jsonl holds a per-step summary of the token weights and TD errors (mean, std, min, max), not the
tokens, so their "histogram over training" is drawn as bands: the mean, a ±1 std band (clipped to
[min, max], since the weights are skewed) and a lighter min–max envelope, with the config's w_min / w_max.

Style: one run: a colour per curve. Several runs: a colour per run (the figure legend names them) and a
line style per curve (the panel legend, in grey). Training curves with at least SMOOTH_MIN_POINTS points
are drawn faint (raw) under an EMA. Non-finite values (e.g. the AUROC of a one-class batch) are dropped.

matplotlib is the optional extra "plots" (pip install 'wmtp[plots]'), imported only when a report is drawn,
and never through pyplot: a bare `Figure` renders with the Agg canvas, headless, and the process's
matplotlib backend (a notebook's) is left as it is.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wmtp.layout import METRICS_FILE, REPORT_NAME, RUN_CONFIG
from wmtp.training.metrics import read_metrics

log = logging.getLogger(__name__)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["PlotsUnavailable", "build_report", "maybe_plot", "panel_lines", "plot_run", "plot_runs"]

RECIPE_SECTIONS = (("rho1", "rho1"), ("td", "verifiable"), ("critic", "critic"))
"""As scripts/compare_runs.py: the section only that recipe's config has, checked in this order; none: baseline."""
VAL = "val/"
HEAD_LOSS = {"baseline": "CE", "verifiable": "TD-weighted CE", "rho1": "CE of the selected pairs"}
"""What loss/head_k is, per recipe (the y label of "loss per head")."""
SMOOTH_MIN_POINTS = 64
NCOLS = 3
PANEL_SIZE = (5.0, 3.2)
"""Inches per panel."""
DPI = 110
LINESTYLES: tuple[Any, ...] = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)))
GREY = "0.3"
HEAD_RE = re.compile(r"^(?P<base>.+)/head_(?P<k>\d+)$")


class PlotsUnavailable(ImportError):
    """matplotlib (the "plots" extra) is not installed."""


def _matplotlib():
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise PlotsUnavailable(
            "run reports need matplotlib, the optional extra 'plots': "
            "pip install 'wmtp[plots]' (or pip install matplotlib)"
        ) from exc
    return Figure, Line2D, Patch


# ------------------------------------------------------------------ runs
@dataclass
class Run:
    """One run folder: its name in legends, recipe, config and {key: (steps, finite values)}."""

    name: str
    recipe: str
    config: dict[str, Any]
    columns: dict[str, tuple[list[int], list[float]]]

    @classmethod
    def load(cls, path: Path, name: str) -> Run:
        if not (path / METRICS_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {METRICS_FILE} (not a run folder, or nothing logged yet)")
        config = tomllib.loads((path / RUN_CONFIG).read_text()) if (path / RUN_CONFIG).is_file() else {}
        columns: dict[str, tuple[list[int], list[float]]] = {}
        for row in read_metrics(path):
            for key, value in row.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    steps, values = columns.setdefault(key, ([], []))
                    steps.append(int(row["step"]))
                    values.append(float(value))
        recipe = next((n for section, n in RECIPE_SECTIONS if section in config), "baseline")
        return cls(name, recipe, config, columns)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        return self.columns.get(key, ([], []))

    def config_value(self, section: str, key: str) -> float | None:
        value = self.config.get(section, {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def header(self) -> str:
        """`name (recipe, steps a–b, N train rows)`; the training steps are the ones that logged lr."""
        steps, rows = self.series("lr")[0], self.series("data/rows")[1]
        span = f"steps {steps[0]}–{steps[-1]}" if steps else "no training steps"
        return f"{self.name} ({self.recipe}, {span}" + (f", {int(rows[-1])} train rows)" if rows else ")")


def _names(paths: Sequence[Path]) -> list[str]:
    """The folder names; more of the path where two runs share one."""
    for depth in range(1, 1 + max(len(p.parts) for p in paths)):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


# ------------------------------------------------------------------ panels
@dataclass(frozen=True)
class Curve:
    """A metric key drawn under a label. `slot` picks the colour (one run) or line style (several runs);
    a held-out curve shares its training twin's slot."""

    label: str
    key: str
    slot: int
    color: str | None = None


@dataclass
class Panel:
    title: str
    ylabel: str
    curves: list[Curve]
    dist: str | None = None
    """A distribution panel: bands from the keys {dist}/std, /min, /max around the curve {dist}/mean."""
    refs: list[tuple[float, str]] = field(default_factory=list)
    """Horizontal reference lines: (y, legend label)."""
    ymin: float | None = None


def _with_val(*curves: Curve) -> list[Curve]:
    """Each training curve followed by its held-out twin."""
    return [c for t in curves for c in (t, Curve(f"{t.label} (val)", VAL + t.key, t.slot, t.color))]


def _per_head(
    runs: Sequence[Run], title: str, ylabel: str, base: str, val: Sequence[str] = (), val_mean: bool = False, **kw: Any
) -> Panel:
    """Curves {base}/head_k and their held-out twins {v}/head_k for each v in `val` (by default val/{base});
    with val_mean, the held-out mean over heads {v} too."""
    val = val or (VAL + base,)
    heads = sorted(
        {int(m["k"]) for r in runs for key in r.columns if (m := HEAD_RE.match(key)) and m["base"] in (base, *val)}
    )
    curves = []
    for slot, k in enumerate(heads):
        curves.append(Curve(f"head {k}", f"{base}/head_{k}", slot))
        curves += [Curve(f"head {k} (val)", f"{v}/head_{k}", slot) for v in val]
    if val_mean:
        curves += [Curve("mean of heads (val)", v, len(heads), "black") for v in val]
    return Panel(title, ylabel, curves, **kw)


def report_panels(runs: Sequence[Run]) -> list[Panel]:
    """The panels of a report over these runs: those some run logged a key of, in report order."""

    def refs(section: str, key: str, label: str) -> list[tuple[float, str]]:
        values = sorted({v for r in runs if (v := r.config_value(section, key)) is not None})
        return [(v, f"{label} = {v:g} (config)") for v in values]

    kinds = list(dict.fromkeys(HEAD_LOSS[r.recipe] for r in runs if r.recipe in HEAD_LOSS))
    head_loss = " | ".join(kinds) or "loss"
    panels = [
        Panel("loss", "loss", _with_val(Curve("loss", "loss", 0), Curve("policy loss", "policy_loss", 1))),
        Panel("value loss", "value loss", _with_val(Curve("value loss", "value_loss", 0))),
        # The verifiable recipe's held-out twin of loss/head_k (the weighted CE) is val/policy_loss/head_k.
        _per_head(runs, "loss per head", head_loss, "loss", val=("val/loss", "val/policy_loss")),
        _per_head(runs, "unweighted CE per head", "cross-entropy (all pairs)", "ce", val_mean=True),
        Panel(
            "token weights",
            "w = clamp(exp(A/β))",
            [Curve("mean", "weight/mean", 0)],
            dist="weight",
            refs=refs("td", "w_min", "w_min") + refs("td", "w_max", "w_max"),
        ),
        Panel("TD errors", "δ", [Curve("mean", "td/mean", 0)], dist="td", refs=[(0.0, "δ = 0")]),
        Panel(
            "clipped weight share",
            "share of response tokens",
            [
                Curve("clipped", "weight/clipped_share", 0),
                Curve("at w_min", "weight/clipped_low_share", 1),
                Curve("at w_max", "weight/clipped_high_share", 2),
            ],
            ymin=0.0,
        ),
        _per_head(runs, "mean weight per head", "mean weight of the head's targets", "weight", val_mean=True),
        _per_head(
            runs,
            "Rho-1 selected fraction per head",
            "share of valid pairs",
            "selected",
            val_mean=True,
            refs=refs("rho1", "ratio", "ratio ρ"),
            ymin=0.0,
        ),
        _per_head(runs, "Rho-1 excess per head", "CE − reference CE", "excess", val_mean=True),
        Panel(
            "critic value: correct vs incorrect",
            "mean V",
            _with_val(
                Curve("correct", "value/correct", 0, "tab:green"), Curve("incorrect", "value/incorrect", 1, "tab:red")
            ),
        ),
        Panel(
            "critic AUROC",
            "AUROC (last-state value vs reward)",
            _with_val(Curve("AUROC", "auroc", 0)),
            refs=[(0.5, "chance")],
        ),
        Panel(
            "weights at the first differing token",
            "mean token weight",
            _with_val(
                Curve("incorrect rows: there", "diag/weight/first_diff", 0, "tab:red"),
                Curve("incorrect rows: other tokens", "diag/weight/other", 1, "tab:orange"),
                Curve("correct rows: there", "diag/weight/first_diff_correct", 2, "tab:green"),
            ),
            refs=[(1.0, "w = 1")],
        ),
        Panel(
            "weights: correct vs incorrect rows",
            "mean token weight",
            _with_val(
                Curve("correct", "diag/weight/correct", 0, "tab:green"),
                Curve("incorrect", "diag/weight/incorrect", 1, "tab:red"),
            ),
            refs=[(1.0, "w = 1")],
        ),
        Panel(
            "critic TD error at the first differing token",
            "δ = V_j - V_{j-1}",
            _with_val(
                Curve("incorrect rows: there", "diag/td/first_diff", 0, "tab:red"),
                Curve("incorrect rows: other tokens", "diag/td/other", 1, "tab:orange"),
                Curve("correct rows: there", "diag/td/first_diff_correct", 2, "tab:green"),
            ),
            refs=[(0.0, "δ = 0")],
        ),
        Panel(
            "first differing token within its row",
            "share of incorrect rows / AUROC",
            _with_val(
                Curve("weight below the row's median", "diag/weight/below_median", 0),
                Curve("AUROC of a low weight", "diag/weight/auroc", 1),
                Curve("δ below the row's median", "diag/td/below_median", 2),
                Curve("AUROC of a low δ", "diag/td/auroc", 3),
            ),
            refs=[(0.5, "chance")],
            ymin=0.0,
        ),
        Panel(
            "Rho-1 selection at the first differing token",
            "selected share of the pairs",
            _with_val(
                Curve("pairs predicting it", "diag/selected/first_diff", 0),
                Curve("other pairs", "diag/selected/other", 1),
            ),
            refs=refs("rho1", "ratio", "ratio ρ"),
            ymin=0.0,
        ),
        Panel(
            "Rho-1 excess at the first differing token",
            "CE − reference CE",
            _with_val(
                Curve("pairs predicting it", "diag/excess/first_diff", 0),
                Curve("other pairs", "diag/excess/other", 1),
            ),
        ),
        Panel("learning rate", "lr", [Curve("lr", "lr", 0)]),
        Panel("throughput", "tokens/s (this rank)", [Curve("tokens/s", "tokens_per_s", 0)]),
        Panel("grad norm", "grad norm (before clipping)", [Curve("grad norm", "grad_norm", 0)]),
    ]
    present = {key for r in runs for key in r.columns}
    return [p for p in panels if any(c.key in present for c in p.curves)]


# ------------------------------------------------------------------ drawing
def _ema(values: list[float]) -> list[float]:
    """Debiased EMA with a span of ~1/30 of the curve (at least 5 points)."""
    beta = 1 - 2 / (max(5.0, len(values) / 30) + 1)
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def _draw_bands(ax: Axes, dist: str, run: Run, color: str) -> bool:
    """±1 std (within min–max) and min–max around the mean; False when the run logged no bands."""
    import numpy as np

    steps, mean = run.series(f"{dist}/mean")
    if not steps:
        return False
    std, lo, hi = (
        np.array([dict(zip(*run.series(f"{dist}/{s}"))).get(t, np.nan) for t in steps]) for s in ("std", "min", "max")
    )
    mean = np.array(mean)
    ax.fill_between(steps, lo, hi, color=color, alpha=0.12, linewidth=0)
    ax.fill_between(steps, np.fmax(mean - std, lo), np.fmin(mean + std, hi), color=color, alpha=0.3, linewidth=0)
    return bool(np.isfinite(std).any() or np.isfinite(lo).any())


def _draw_panel(ax: Axes, panel: Panel, runs: Sequence[Run], Line2D: Any, Patch: Any) -> bool:
    """Draw the panel; True when a curve was smoothed. Each data line's gid is "run:key"."""
    multi, smoothed, banded = len(runs) > 1, False, False
    legend: dict[str, Any] = {}
    for i_run, run in enumerate(runs):
        if panel.dist:
            banded |= _draw_bands(ax, panel.dist, run, f"C{i_run % 10}")
        for c in panel.curves:
            steps, values = run.series(c.key)
            if not steps:
                continue
            held_out = c.key.startswith(VAL)
            if multi:
                color, ls = f"C{i_run % 10}", LINESTYLES[c.slot % len(LINESTYLES)]
            else:
                color, ls = c.color or f"C{c.slot % 10}", "--" if held_out else "-"
            kw = dict(color=color, linestyle=ls, marker="o" if held_out or len(steps) == 1 else None, markersize=3.5)
            if not held_out and len(steps) >= SMOOTH_MIN_POINTS:
                ax.plot(steps, values, linewidth=0.6, alpha=0.25, **kw)
                values, smoothed = _ema(values), True
            ax.plot(
                steps,
                values,
                label=f"{run.name}: {c.label}",
                gid=f"{run.name}:{c.key}",
                linewidth=1.0 if held_out else 1.5,
                **kw,
            )
            legend.setdefault(c.label, Line2D([], [], **{**kw, "color": GREY if multi else color}))
    face = GREY if multi else "C0"
    if banded:
        legend["±1 std (within min–max)"] = Patch(color=face, alpha=0.3, linewidth=0)
        legend["min – max"] = Patch(color=face, alpha=0.12, linewidth=0)
    for (y, label), ls in zip(panel.refs, [":", "-.", (0, (1, 1)), (0, (4, 2))] * len(panel.refs)):
        ax.axhline(y, color="0.45", linewidth=0.9, linestyle=ls, zorder=0)
        legend[label] = Line2D([], [], color="0.45", linewidth=0.9, linestyle=ls)
    if panel.ymin is not None:
        top = max(ax.get_ylim()[1], panel.ymin + 1e-3)
        ax.set_ylim(panel.ymin - 0.03 * (top - panel.ymin), top)  # a curve at the floor stays visible
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel(panel.ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3, linewidth=0.5)
    if len(legend) > 1 or panel.refs:  # one curve needs none: the title names it, the header the run
        ax.legend(list(legend.values()), list(legend), fontsize=7, framealpha=0.8, ncols=2 if len(legend) > 4 else 1)
    return smoothed


def build_report(run_dirs: Sequence[str | Path]) -> Figure:
    """The report figure of these runs, overlaid (not saved): one titled axes per panel."""
    if not run_dirs:
        raise ValueError("no run folders given")
    Figure, Line2D, Patch = _matplotlib()
    paths = [Path(p) for p in run_dirs]
    runs = [Run.load(p, n) for p, n in zip(paths, _names([p.resolve() for p in paths]))]
    panels = report_panels(runs)
    if not panels:
        raise ValueError(f"nothing to plot: no training metrics in {', '.join(map(str, paths))}")
    ncols = min(NCOLS, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    legend_rows = math.ceil(len(runs) / 4) if len(runs) > 1 else 0
    fig = Figure(
        figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows + 0.7 + 0.25 * legend_rows), dpi=DPI, layout="constrained"
    )
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    smoothed = [_draw_panel(ax, panel, runs, Line2D, Patch) for ax, panel in zip(axes, panels)]
    for ax in axes[len(panels) :]:
        fig.delaxes(ax)
    if len(runs) == 1:
        fig.suptitle(runs[0].header(), fontsize=12)
    else:  # the legend of the runs is the header (a suptitle would overlap it)
        fig.legend(
            [Line2D([], [], color=f"C{i % 10}", linewidth=2.5) for i in range(len(runs))],
            [r.header() for r in runs],
            loc="outside upper center",
            ncols=min(len(runs), 4),
            fontsize=9,
            frameon=False,
        )
    if any(smoothed):
        fig.supxlabel(
            f"training curves with ≥{SMOOTH_MIN_POINTS} points: faint = raw, solid = EMA; markers = held-out (val/)",
            fontsize=8,
            color="0.35",
        )
    return fig


def panel_lines(fig: Figure) -> dict[str, dict[str, int]]:
    """{panel title: {"run:key": points}} of the data lines drawn (not the faint raw lines under an EMA,
    nor reference lines). For tests and for a quick look at what a report holds."""
    return {
        ax.get_title(): {ln.get_gid(): len(ln.get_xdata()) for ln in ax.get_lines() if ln.get_gid()} for ax in fig.axes
    }


# ------------------------------------------------------------------ entry points
def plot_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """One PNG report of these runs, overlaid (a colour per run), written to `out` (parents made)."""
    fig = build_report(run_dirs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI)
    return out


def plot_run(run_dir: str | Path) -> Path:
    """The report of one run, written to RUN_DIR/report.png."""
    return plot_runs([run_dir], Path(run_dir) / REPORT_NAME)


def maybe_plot(run_dir: str | Path) -> Path | None:
    """For the end of a run (rank 0): write RUN_DIR/report.png, print one line and return its path.
    Without matplotlib, or when the report cannot be drawn, print why and return None: a report is never
    worth failing a finished run for."""
    try:
        path = plot_run(run_dir)
    except PlotsUnavailable:
        log.info("[plots] matplotlib not installed, no %s (pip install 'wmtp[plots]')", REPORT_NAME)
        return None
    except Exception as exc:  # noqa: BLE001 - see the docstring; the tests cover the drawing itself
        log.info("[plots] no report: %s: %s", type(exc).__name__, exc)
        return None
    log.info("[plots] report -> %s", path)
    return path
