"""A sweep's figures (PNG, matplotlib's Agg backend): a metric against one swept field
(differences resolved after Holm's correction starred), the loss curves of all points on
one figure, the KV-budget frontier (a metric against KV-cache bytes per token,
Pareto-optimal configurations joined), and a tuning sweep's losses against the tuned value
(`plot_tuning`). `write_figures` draws a finished sweep's."""

from __future__ import annotations

import pathlib
from typing import Any, Iterable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mqa.sweep.points import POINTS_FIELD, SEED_FIELD  # noqa: E402


def plot_metric(rows: list[dict], x: str, y: str, series: list[str], path: pathlib.Path,
                *, ylabel: str, title: str, error: str | None = None,
                zero_line: bool = False, resolved: str | None = None) -> None:
    """`y` against `x` (columns of the table's rows), one line per combination of the
    `series` columns (the other swept fields), with `error` (a column of half-widths, e.g.
    95% intervals) as error bars where it has a value, and a black star on the rows whose
    `resolved` column is true. Numeric x on a log2 axis when positive; other x
    (configuration names) as categories in table order, their labels slanted and the figure
    widened to keep a dozen of them apart."""
    numeric = all(isinstance(r[x], (int, float)) and not isinstance(r[x], bool) for r in rows)
    categories = len({str(r[x]) for r in rows})
    fig, axis = plt.subplots(figsize=(6 if numeric else max(6.0, 2.0 + 0.55 * categories), 4.5))
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[s] for s in series), []).append(row)
    for key, members in groups.items():
        members = [r for r in members if r.get(y) is not None]
        if numeric:
            members.sort(key=lambda r: r[x])
        label = ", ".join(f"{s.rpartition('.')[2]}={v}" for s, v in zip(series, key)) or None
        bars = [r.get(error) or 0.0 for r in members] if error else None
        axis.errorbar([r[x] if numeric else str(r[x]) for r in members], [r[y] for r in members],
                      yerr=bars, fmt="o-" if numeric else "o", capsize=4, label=label)
    starred = [r for r in rows if resolved and r.get(resolved) is True and r.get(y) is not None]
    if starred:
        axis.plot([r[x] if numeric else str(r[x]) for r in starred], [r[y] for r in starred],
                  "*", color="black", markersize=13, zorder=3,
                  label="resolved (Holm-adjusted p < 0.05)")
    if zero_line:
        axis.axhline(0.0, color="grey", linewidth=0.8)
    if numeric and all(r[x] > 0 for r in rows):
        axis.set_xscale("log", base=2)
        ticks = sorted({r[x] for r in rows})
        axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
    if not numeric:
        plt.setp(axis.get_xticklabels(), rotation=40, ha="right", rotation_mode="anchor")
    axis.set_xlabel(x)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    if series or starred:
        axis.legend(fontsize="small")
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


def pareto_front(rows: list[dict], x: str, y: str, *, lower_is_better: bool = True) -> list[dict]:
    """The rows no other row beats on both: fewer `x` (bytes) and a better `y` (lower loss,
    or higher with lower_is_better=False), in order of increasing x."""
    sign = 1.0 if lower_is_better else -1.0
    front, best = [], float("inf")
    for row in sorted(rows, key=lambda r: (r[x], sign * r[y])):
        if sign * row[y] < best:
            front.append(row)
            best = sign * row[y]
    return front


def plot_frontier(rows: list[dict], y: str, path: pathlib.Path, *, ylabel: str, title: str,
                  error: str | None = None, lower_is_better: bool = True,
                  x: str = "kv_cache_bytes_per_token", resolved: str | None = None,
                  baseline: str | None = None) -> None:
    """`y` (with `error` half-widths as bars) against KV-cache bytes per token on a log
    axis, a labelled point per configuration, the Pareto-optimal ones joined, and a black
    ring around the points whose `resolved` column is true (their difference from
    `baseline` survives Holm's correction)."""
    rows = [r for r in rows if r.get(y) is not None and r.get(x)]
    fig, axis = plt.subplots(figsize=(7.5, 4.8))
    spread = (max(r[y] for r in rows) - min(r[y] for r in rows)) if rows else 0.0
    placed: list[tuple[float, float]] = []  # points whose label went above them
    for index, row in enumerate(rows):
        axis.errorbar([row[x]], [row[y]], yerr=[row.get(error) or 0.0] if error else None,
                      fmt="o", capsize=4, color=f"C{index % 10}")
        # a point on top of a labelled one (same bytes, a close value) gets its label below
        crowded = any(abs(row[x] / px - 1) < 0.05 and abs(row[y] - py) <= 0.04 * spread
                      for px, py in placed)
        axis.annotate(row["configuration"], (row[x], row[y]), textcoords="offset points",
                      xytext=(5, -11 if crowded else 5), fontsize="small")
        if not crowded:
            placed.append((row[x], row[y]))
    ringed = [r for r in rows if resolved and r.get(resolved) is True]
    if ringed:
        axis.plot([r[x] for r in ringed], [r[y] for r in ringed], "o", markersize=13,
                  markerfacecolor="none", color="black", zorder=3,
                  label=f"differs from {baseline or 'the baseline'} (Holm-adjusted p < 0.05)")
    front = pareto_front(rows, x, y, lower_is_better=lower_is_better)
    axis.plot([r[x] for r in front], [r[y] for r in front], "-", color="black", linewidth=1,
              alpha=0.6, label="Pareto front (means)")
    axis.set_xscale("log")
    axis.set_xlabel("KV-cache bytes per token")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(True, alpha=0.3, which="both")
    axis.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_figures(workdir: pathlib.Path, fields: Iterable[str], rows: list[dict],
                  curves: Mapping[str, list[Mapping[str, list[tuple[int, float]]]]],
                  baseline: str, decode_batch: int) -> None:
    """Writes WORKDIR/eval_loss.png, eval_loss_diff.png, decode_tokens_per_sec.png (against
    num_kv_heads, else the first swept field, else the configuration names; a line per
    value of the other swept fields), loss_curves.png, frontier.png, frontier_decode.png
    and, where the kernel was timed, frontier_decode_kernel.png. fields: the swept dotted
    names; rows: the configuration rows (`mqa.sweep.results.configuration_rows`); curves: as
    `plot_loss_curves` takes them."""
    swept = [name for name in fields if name != SEED_FIELD]
    x = ("num_kv_heads" if "model.num_kv_heads" in swept
         else "configuration" if not swept or swept[0] == POINTS_FIELD else swept[0])
    series = [name for name in swept if name not in ("model.num_kv_heads", x, POINTS_FIELD)]
    plot_metric(rows, x, "eval_loss_mean", series, workdir / "eval_loss.png",
                error="eval_loss_ci95", ylabel="held-out loss (nats/token)",
                title=f"held-out loss, mean and 95% interval over "
                f"{'/'.join(sorted({str(r['n']) for r in rows}))} seeds")
    plot_metric(rows, x, "eval_loss_diff", series, workdir / "eval_loss_diff.png",
                error="eval_loss_diff_ci95", zero_line=True, resolved="eval_loss_diff_resolved",
                ylabel="difference in held-out loss (nats/token)",
                title=f"seed-paired difference against {baseline}, 95% interval;\n"
                "starred: resolved after Holm's correction")
    plot_metric(rows, x, "decode_tokens_per_sec", series, workdir / "decode_tokens_per_sec.png",
                ylabel="tokens/s", title=f"decoding, batch {decode_batch}, context "
                f"{'/'.join(sorted({str(r['decode_context']) for r in rows}))}")
    plot_loss_curves(curves, workdir / "loss_curves.png")
    context = "/".join(sorted({str(r["decode_context"]) for r in rows}))
    plot_frontier(rows, "eval_loss_mean", workdir / "frontier.png", error="eval_loss_ci95",
                  ylabel="held-out loss (nats/token), mean and 95% interval",
                  title=f"held-out loss against KV cache (at context {context})",
                  resolved="eval_loss_diff_resolved", baseline=baseline)
    plot_frontier(rows, "decode_tokens_per_sec", workdir / "frontier_decode.png",
                  lower_is_better=False, ylabel="decoding tokens/s",
                  title=f"decoding, batch {decode_batch}, context {context}")
    if any(r.get("decode_kernel_tokens_per_sec") for r in rows):  # sweep.py --decode_kernel
        plot_frontier(rows, "decode_kernel_tokens_per_sec", workdir / "frontier_decode_kernel.png",
                      lower_is_better=False, ylabel="decoding tokens/s, C++ kernel",
                      title=f"decoding through the C++ kernel, batch {decode_batch}, "
                      f"context {context}")


def plot_tuning(rows: list[dict], column: str, chosen: Mapping[str, Any], path: pathlib.Path,
                *, xlabel: str, means: Mapping[str, list[float]], values: list) -> None:
    """A tuning sweep's tuning-half loss against the tuned value, a line per configuration
    through the means over tuning seeds (`means`: {configuration: [mean per value]}; an
    infinite one, a diverged value, left out), each tuning run a small dot and the chosen
    value ringed. rows: tuning.csv's rows (`column`: the tuned field's values); x on a log
    axis when every value is a positive number, else categories in the order listed."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
    position = {repr(v): (v if numeric else str(v)) for v in values}
    fig, axis = plt.subplots(figsize=(6.5, 4.2))
    for index, (name, by_value) in enumerate(means.items()):
        color = f"C{index % 10}"
        finite = [(position[repr(v)], m) for v, m in zip(values, by_value) if m != float("inf")]
        if finite:
            axis.plot(*zip(*finite), "o-", color=color, label=name)
        runs = [r for r in rows if r["configuration"] == name and r.get("eval_loss") is not None]
        axis.plot([position[repr(r[column])] for r in runs], [r["eval_loss"] for r in runs], ".",
                  color=color, alpha=0.4)
        best = [(position[repr(v)], m) for v, m in zip(values, by_value)
                if repr(v) == repr(chosen.get(name)) and m != float("inf")]
        if best:
            axis.plot(*zip(*best), "o", markersize=14, markerfacecolor="none", color=color)
    if numeric:
        axis.set_xscale("log")
        axis.set_xticks(values, [f"{v:g}" for v in values])
        axis.minorticks_off()
    axis.set_xlabel(xlabel)
    axis.set_ylabel("held-out loss, tuning half (nats/token)")
    axis.set_title("tuning: mean over tuning seeds (dots: each run; ringed: chosen)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
