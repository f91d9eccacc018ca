"""Pictures of training: a run's loss curves from its ``log.jsonl`` (``chargpt plot``) and
the speedrun's validation loss against training seconds (``bench.speedrun --plot``).

matplotlib is an optional extra (``pip install 'chargpt[plot]'``), imported only when a
picture is drawn, with the Agg backend (files, no display).
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MEDIAN_POINTS = 200  # where the median of a configuration's seeds is drawn


class PlotError(Exception):
    """Why a picture could not be drawn, in one line."""


class MatplotlibMissingError(PlotError):
    """matplotlib is not installed: an environment to fix, not bad input."""


@dataclass(frozen=True)
class Curve:
    """A run's evaluations in the order they were logged."""

    steps: tuple[int, ...]
    train_s: tuple[float, ...]  # seconds of training steps (evaluation not counted)
    train_loss: tuple[float, ...]
    val_loss: tuple[float, ...]  # as estimated during the run (--eval-tokens may sample)
    exact_val_loss: float | None  # the last evaluation's over the whole split, if made

    def final_val(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Training seconds and validation loss, the last point over the whole split when
        the run measured it (what ``bench.speedrun`` reports)."""
        val = self.val_loss
        if self.exact_val_loss is not None:
            val = (*val[:-1], self.exact_val_loss)
        return self.train_s, val


FIELDS = {"step": int, "train_loss": float, "val_loss": float, "train_s": float}


def read_log(path: Path) -> Curve:
    """The evaluations in ``path`` (a run's ``log.jsonl``). A last line without its newline
    is one the trainer is writing (or was killed writing) and is left out."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlotError(f"{path}: no such file (a run directory holds log.jsonl)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlotError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    lines = text.split("\n")[:-1]  # the last piece: "" or a torn line
    records = [_record(path, number, line) for number, line in enumerate(lines, 1) if line]
    if not records:
        raise PlotError(f"{path}: no evaluations logged yet")
    exact = records[-1].get("exact_val_loss")
    return Curve(
        steps=tuple(r["step"] for r in records),
        train_s=tuple(r["train_s"] for r in records),
        train_loss=tuple(r["train_loss"] for r in records),
        val_loss=tuple(r["val_loss"] for r in records),
        exact_val_loss=None if exact is None else float(exact),
    )


def _record(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        raise PlotError(f"{path}, line {number}: not JSON") from None
    if not isinstance(record, dict):
        raise PlotError(f"{path}, line {number}: not an evaluation record")
    for name, kind in FIELDS.items():
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PlotError(f"{path}, line {number}: no number {name!r}")
        record[name] = kind(value)
    exact = record.get("exact_val_loss")
    if exact is not None and (isinstance(exact, bool) or not isinstance(exact, int | float)):
        raise PlotError(f"{path}, line {number}: 'exact_val_loss' is not a number")
    return record


def require_matplotlib(command: str) -> None:
    """Fail now, in one line, if ``command`` could not draw for want of matplotlib."""
    _pyplot(command)


def _pyplot(command: str) -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MatplotlibMissingError(
            f"{command} needs matplotlib: pip install 'chargpt[plot]'"
        ) from None
    return plt


def plot_run(curve: Curve, output: Path, title: str, command: str = "chargpt plot") -> Path:
    """Train and validation loss against steps (training seconds along the top) into
    ``output`` (the format follows its extension: .png, .svg, .pdf)."""
    plt = _pyplot(command)
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    try:
        ax.plot(curve.steps, curve.train_loss, label="train", color="C0")
        ax.plot(curve.steps, curve.val_loss, label="validation", color="C1")
        if curve.exact_val_loss is not None:
            ax.plot(
                curve.steps[-1:], [curve.exact_val_loss], "*", color="C3", markersize=12,
                label=f"validation, whole split: {curve.exact_val_loss:.4f}",
            )  # fmt: skip
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("loss (nats per character)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        _seconds_on_top(ax, curve)
        return _save(fig, output)
    finally:
        plt.close(fig)


def _seconds_on_top(ax: Axes, curve: Curve) -> None:
    """Training seconds as a second x axis, where steps map to seconds one to one."""
    steps, seconds = curve.steps, curve.train_s
    increasing = all(b > a for xs in (steps, seconds) for a, b in itertools.pairwise(xs))
    if len(steps) < 2 or not increasing:
        return
    import numpy as np

    top = ax.secondary_xaxis(
        "top",
        functions=(lambda x: np.interp(x, steps, seconds), lambda s: np.interp(s, seconds, steps)),
    )
    top.set_xlabel("seconds of training")


def plot_speedrun(
    panels: Mapping[str, Mapping[str, Sequence[Curve]]],
    output: Path,
    command: str = "bench.speedrun --plot",
) -> Path:
    """Validation loss against training seconds: one panel per budget (``panels``: title to
    configuration to its runs), every run thin, the median of each configuration's runs
    bold. The first quarter of the time (the fast fall from the untrained loss) may rise
    above the top of the axis, so that the ends, where the recipes differ, can be read."""
    if not panels or not all(runs for configs in panels.values() for runs in configs.values()):
        raise PlotError("nothing to plot: no runs")
    plt = _pyplot(command)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(7 * len(panels), 5), layout="constrained", squeeze=False
    )
    try:
        for ax, (title, configs) in zip(axes[0], panels.items(), strict=True):
            _speedrun_panel(ax, title, configs)
        return _save(fig, output)
    finally:
        plt.close(fig)


def _speedrun_panel(ax: Axes, title: str, configs: Mapping[str, Sequence[Curve]]) -> None:
    shown: list[float] = []  # the losses the y axis must hold
    for i, (name, runs) in enumerate(configs.items()):
        color = f"C{i}"
        for run in runs:
            ax.plot(*run.final_val(), color=color, linewidth=0.8, alpha=0.4)
        seconds, median = median_curve(runs)
        finals = [run.final_val()[1][-1] for run in runs]
        ax.plot(
            seconds, median, color=color, linewidth=2.5,
            label=f"{name}: {statistics.median(finals):.4f} (median of {len(runs)})",
        )  # fmt: skip
        end = max(run.train_s[-1] for run in runs)
        shown += [v for run in runs for t, v in zip(*run.final_val(), strict=True) if t >= end / 4]
    if shown:
        low, high = min(shown), max(shown)
        margin = max(0.05 * (high - low), 0.01)
        ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("seconds of training")
    ax.set_ylabel("validation loss (nats per character)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def median_curve(runs: Sequence[Curve]) -> tuple[list[float], list[float]]:
    """The median over ``runs`` of their validation loss (interpolated in seconds) from the
    latest first evaluation to the earliest last one; one run: that run itself."""
    if len(runs) == 1:
        seconds, val = runs[0].final_val()
        return list(seconds), list(val)
    import numpy as np

    start = max(run.train_s[0] for run in runs)
    end = min(run.train_s[-1] for run in runs)
    grid = np.linspace(start, end, MEDIAN_POINTS) if end > start else np.array([end])
    values = np.stack([np.interp(grid, *run.final_val()) for run in runs])
    return grid.tolist(), np.median(values, axis=0).tolist()


def _save(fig: Figure, output: Path) -> Path:
    try:
        fig.savefig(output, dpi=120)
    except OSError as exc:
        raise PlotError(f"cannot write {output}: {exc.strerror or exc}") from None
    except ValueError as exc:  # an extension matplotlib cannot write
        raise PlotError(f"cannot write {output}: {exc}") from None
    return output
