"""A sweep's figures (PNG, matplotlib's Agg backend): a metric against one swept field,
and the loss curves of all points on one figure."""

from __future__ import annotations

import pathlib
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_metric(rows: list[dict], x: str, y: str, series: list[str], path: pathlib.Path,
                *, ylabel: str, title: str, error: str | None = None,
                zero_line: bool = False) -> None:
    """`y` against `x` (columns of the table's rows), one line per combination of the
    `series` columns (the other swept fields), with `error` (a column of half-widths, e.g.
    95% intervals) as error bars where it has a value. Numeric x on a log2 axis when
    positive; other x (configuration names) as categories in table order."""
    fig, axis = plt.subplots(figsize=(6, 4))
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[s] for s in series), []).append(row)
    numeric = all(isinstance(r[x], (int, float)) and not isinstance(r[x], bool) for r in rows)
    for key, members in groups.items():
        members = [r for r in members if r.get(y) is not None]
        if numeric:
            members.sort(key=lambda r: r[x])
        label = ", ".join(f"{s.rpartition('.')[2]}={v}" for s, v in zip(series, key)) or None
        bars = [r.get(error) or 0.0 for r in members] if error else None
        axis.errorbar([r[x] if numeric else str(r[x]) for r in members], [r[y] for r in members],
                      yerr=bars, fmt="o-" if numeric else "o", capsize=4, label=label)
    if zero_line:
        axis.axhline(0.0, color="grey", linewidth=0.8)
    if numeric and all(r[x] > 0 for r in rows):
        axis.set_xscale("log", base=2)
        ticks = sorted({r[x] for r in rows})
        axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
    if not numeric:
        axis.tick_params(axis="x", labelrotation=20)
    axis.set_xlabel(x)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    if series:
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_curves(curves: Mapping[str, list[Mapping[str, list[tuple[int, float]]]]],
                     path: pathlib.Path) -> None:
    """Train loss (thin) and held-out loss (markers) against step, one colour per
    configuration, one line per seed. curves: {configuration: [{"loss": [(step, value)],
    "eval_loss": [(step, value)]} for each of its points]}."""
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for index, (name, runs) in enumerate(curves.items()):
        color = f"C{index % 10}"
        for seed, curve in enumerate(runs):
            if curve["loss"]:
                axis.plot(*zip(*curve["loss"]), color=color, alpha=0.5, linewidth=0.8,
                          label=None if seed else f"{name} train")
            if curve["eval_loss"]:
                axis.plot(*zip(*curve["eval_loss"]), "o--", color=color, markersize=3,
                          linewidth=0.8, label=None if seed else f"{name} held-out")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats/token)")
    axis.set_title("training curves" + (" (a line per seed)" if any(
        len(runs) > 1 for runs in curves.values()) else ""))
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
