"""Figures of training runs from their `metrics.jsonl` (one JSON object per step and per epoch).

    python -m utils.plots RUN_DIR [RUN_DIR ...] --out DIR [--x step|epoch]

writes one PNG per metric family found in the runs: loss, learning rate, gradient norm,
samples/s, online k-NN accuracy (every `knn@*` key), linear-probe accuracy, and GroCo's similarity
statistics (largest / smallest positive and negative similarity, pos_min - neg_max). Several runs
share each figure (the similarities: a panel per run), labelled by their folder
(`<name>/<MMDD_HHMMSS>`). Long noisy series are drawn faint under their running mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

SIMILARITIES = {  # metrics.jsonl key: (legend, colour for a single run, line style); GroCo's first anchor
    "info_pos_max": ("largest positive", "C2", "-"),
    "info_pos_min": ("smallest positive", "C2", "--"),
    "info_neg_max": ("largest negative", "C3", "-"),
    "info_neg_min": ("smallest negative", "C3", "--"),
}


@dataclasses.dataclass
class RunMetrics:
    """One run's records: per step (`loss`, `lr`, ...) and per epoch (evaluators, `train_loss`)."""

    label: str
    steps: list[dict]
    epochs: list[dict]

    def step_x(self, axis: str) -> np.ndarray:
        """x of every step record: its index, or its epoch plus its fraction of that epoch."""
        if axis == "step":
            return np.array([r["step"] for r in self.steps], dtype=float)
        per_epoch: dict[int, list[int]] = {}
        for r in self.steps:
            per_epoch.setdefault(r["epoch"], []).append(r["step"])
        x = []
        for r in self.steps:
            steps = per_epoch[r["epoch"]]
            x.append(r["epoch"] + (r["step"] - min(steps)) / len(steps))
        return np.array(x)

    def epoch_x(self, axis: str) -> np.ndarray:
        """x of every epoch record: steps done, or epochs done (the record of epoch e ends it)."""
        if axis == "step":
            return np.array([r["step"] for r in self.epochs], dtype=float)
        return np.array([r["epoch"] + 1 for r in self.epochs], dtype=float)

    def epoch_mid_x(self, axis: str) -> np.ndarray:
        """x of the middle of each epoch record's epoch, where a mean over the epoch belongs."""
        steps_x = self.step_x(axis)
        by_epoch: dict[int, list[float]] = {}
        for r, x in zip(self.steps, steps_x):
            by_epoch.setdefault(r["epoch"], []).append(x)
        ends = self.epoch_x(axis)
        return np.array([np.mean(by_epoch[r["epoch"]]) if r["epoch"] in by_epoch else end
                         for r, end in zip(self.epochs, ends)])


def read_run(path: str | Path) -> RunMetrics:
    """The records of a run folder (or of a metrics.jsonl file)."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl")
    try:
        records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not JSON lines ({err})") from None
    folder = file.parent
    return RunMetrics(
        label=f"{folder.parent.name}/{folder.name}",
        steps=[r for r in records if "loss" in r],
        epochs=[r for r in records if "loss" not in r],
    )


def smooth(values: np.ndarray, points: int = 300) -> Optional[np.ndarray]:
    """A running mean that leaves about `points` independent points, for a long noisy series;
    None for a short one."""
    window = len(values) // points
    if window < 2:
        return None
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_series(ax: Axes, x: np.ndarray, y: np.ndarray, label: str, color: str, style: str = "-",
                noisy: bool = True) -> None:
    """A line per run; a long noisy series is drawn faint with its running mean on top."""
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(y) == 0:
        return
    mean = smooth(y) if noisy else None
    if mean is None:
        ax.plot(x, y, style, color=color, label=label, marker="o" if len(y) < 30 else None, markersize=3)
        return
    ax.plot(x, y, style, color=color, alpha=0.25, linewidth=0.8)
    offset = (len(y) - len(mean)) // 2
    ax.plot(x[offset:offset + len(mean)], mean, style, color=color, label=label)


def values(records: list[dict], key: str) -> np.ndarray:
    return np.array([r.get(key, np.nan) for r in records], dtype=float)


def has(records: list[dict], key: str) -> bool:
    return any(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) for r in records)


def step_family(key: str, epoch_key: Optional[str] = None, noisy: bool = True) -> Callable:
    """A figure of one per-step metric (and, when given, its per-epoch mean as dots); a noisy one
    gets a running mean."""

    def draw(ax: Axes, runs: list[RunMetrics], axis: str, colors: list[str]) -> bool:
        drawn = False
        for run, color in zip(runs, colors):
            if has(run.steps, key):
                plot_series(ax, run.step_x(axis), values(run.steps, key), run.label, color, noisy=noisy)
                drawn = True
            if epoch_key and has(run.epochs, epoch_key):
                ax.plot(run.epoch_mid_x(axis), values(run.epochs, epoch_key), "o", color=color, markersize=5,
                        markeredgecolor="black", markeredgewidth=0.6)
        return drawn

    return draw


def epoch_prefix_family(prefix: str) -> Callable:
    """A figure of every per-epoch metric whose name starts with `prefix` (`knn@20_online`, ...)."""

    def draw(ax: Axes, runs: list[RunMetrics], axis: str, colors: list[str]) -> bool:
        drawn = False
        styles = ["-", "--", "-.", ":"]
        for run, color in zip(runs, colors):
            keys = sorted({k for r in run.epochs for k in r if k.startswith(prefix) and has(run.epochs, k)})
            for i, key in enumerate(keys):
                y = 100 * values(run.epochs, key)
                keep = np.isfinite(y)
                label = f"{run.label} {key}" if len(runs) > 1 or len(keys) > 1 else run.label
                ax.plot(run.epoch_x(axis)[keep], y[keep], styles[i % len(styles)], color=color, marker="o",
                        markersize=3, label=label)
                drawn = True
        return drawn

    return draw


def draw_similarities(ax: Axes, runs: list[RunMetrics], axis: str, colors: list[str]) -> bool:
    """Positives in green, negatives in red; one run per panel. With 2 views there is one
    positive: its largest and smallest coincide."""
    (run,) = runs
    drawn = False
    for key, (text, color, style) in SIMILARITIES.items():
        if has(run.steps, key):
            plot_series(ax, run.step_x(axis), values(run.steps, key), text, color, style)
            drawn = True
    return drawn


@dataclasses.dataclass(frozen=True)
class Family:
    """One figure: file name, title, y label, how to draw it (`draw(ax, runs, axis, colors)` says
    whether it drew anything), log scale when every value is positive, one panel per run."""

    name: str
    title: str
    ylabel: str
    draw: Callable
    log_y: bool = False
    panel_per_run: bool = False


FAMILIES = (
    Family("loss", "Training loss (dots: mean over the epoch)", "loss", step_family("loss", "train_loss")),
    Family("lr", "Learning rate", "learning rate", step_family("lr", noisy=False)),
    Family("grad_norm", "Gradient norm (before clipping)", "L2 norm", step_family("grad_norm"), log_y=True),
    Family("samples_per_s", "Training throughput", "samples / s", step_family("samples_per_s")),
    Family("knn", "Online k-NN accuracy", "top-1 accuracy (%)", epoch_prefix_family("knn@")),
    Family("linear_probe", "Linear-probe accuracy", "accuracy (%)", epoch_prefix_family("linear_prob")),
    Family("similarity", "GroCo: positive and negative cosine similarities (first anchor)", "cosine similarity",
           draw_similarities, panel_per_run=True),
    Family("pos_neg_dist", "GroCo: smallest positive - largest negative similarity", "pos_min - neg_max",
           step_family("info_pos_neg_dist")),
)


def plot_runs(runs: list[RunMetrics], out: str | Path, axis: str = "step") -> list[Path]:
    """Write `<family>.png` into `out` for every family some run has data for; return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    written = []
    for family in FAMILIES:
        fig = draw_family(family, runs, axis, colors)
        if fig is None:
            continue
        path = out / f"{family.name}.png"
        fig.savefig(path)
        written.append(path)
    return written


def draw_family(family: Family, runs: list[RunMetrics], axis: str, colors: list[str]) -> Optional[Figure]:
    """The family's figure (one panel, or one per run), or None when no run has its metrics."""
    groups = [[run] for run in runs] if family.panel_per_run else [runs]
    fig = Figure(figsize=(8, 1.5 + 3.3 * len(groups)), dpi=120, layout="constrained")
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    drawn = [family.draw(ax, group, axis, colors) for ax, group in zip(axes, groups)]
    if not any(drawn):
        return None
    fig.suptitle(family.title)
    for ax, group, has_data in zip(axes, groups, drawn):
        if family.panel_per_run:
            ax.set_title(group[0].label if has_data else f"{group[0].label}: no data", fontsize="medium")
        ax.set_ylabel(family.ylabel)
        if family.log_y and ax.get_lines() and all((line.get_ydata() > 0).all() for line in ax.get_lines()):
            ax.set_yscale("log")
        if family.name == "pos_neg_dist":
            ax.axhline(0.0, color="black", linewidth=0.8)
        ax.grid(True, alpha=0.3)
        if has_data:
            ax.legend(fontsize="small")
    axes[-1].set_xlabel("step" if axis == "step" else "epoch")
    return fig


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (or their metrics.jsonl)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNG files")
    parser.add_argument("--x", choices=["step", "epoch"], default="step", help="x axis (default: step)")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(path) for path in args.runs]
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    written = plot_runs(runs, args.out, args.x)
    for path in written:
        print(path)
    if not written:
        print("error: the runs hold no metrics to plot", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
