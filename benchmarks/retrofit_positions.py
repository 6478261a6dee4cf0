"""Where along the context a retrofitted cache loses: KL(original || model) by position.

  python benchmarks/retrofit_positions.py --workdir=runs/retrofit_w2048 \\
      --models "window 341 + 4 sinks" "window 341 + 4 sinks, distilled" \\
      --out benchmarks/results/retrofit_w2048

scores each model on the held-out windows `benchmarks/retrofit.py` scores (--windows of
--seq_len tokens from the start of --text's held-out tail) against the original (WORKDIR's
source, or --source) and averages KL(original || model) and the model's loss over buckets
of --bucket consecutive positions. A model is named as in retrofit.py's tables: "original", a
zero-shot conversion in WORKDIR by its name ("window 341 + 4 sinks"), a distilled run by its
row name ("window 341 + 4 sinks, distilled, seed 1"). Per window and bucket into
positions_windows.jsonl (resumable: a re-run scores only what is missing), then
positions.{csv,json,md} (or --table's name): per model and bucket, and over all positions,
the mean over windows with its 95% t-interval, and each model's KL and loss differences
from the first, paired by window (intervals and p-values); and positions.png: KL, and
loss less the first model's, against position.

A window of W positions with S attention sinks sees everything the original sees at the
first W + S positions, so a window conversion's KL is zero there: what it loses lies past
them, and the plot shows how it grows with distance and how much of it distillation takes
back at each distance.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import retrofit  # noqa: E402
from mqa import statistics  # noqa: E402
from mqa.loading import load_model  # noqa: E402

OUT = retrofit.OUT


def model_path(workdir: pathlib.Path, name: str, source: pathlib.Path) -> pathlib.Path:
    """A model's workdir from its name in retrofit.py's tables ("original": `source`; one
    line's exit if none)."""
    if name == "original":
        return source
    if ", distilled" in name:
        base, seed, steps, dtype = retrofit.parse_distilled_label(name)
        if dtype:
            sys.exit(f"error: --models {name!r}: score the run without its quantized cache")
        path = retrofit.distilled_dir(workdir, base, seed, steps)
    else:
        path = workdir / name.replace(" ", "_")
    if not (path / "config.json").is_file():
        sys.exit(f"error: --models {name!r}: no such model in {workdir} ({path} holds none); "
                 f"run benchmarks/retrofit.py for it first")
    return path


def by_bucket(rows: dict, names: list[str], windows: int) -> list[dict]:
    """Per model, a row per bucket and one over all positions (`span` "all"): mean KL and
    loss over the windows with 95% t-intervals, and the window-paired KL and loss
    differences from names[0]."""
    def scores(name: str, w: int, metric: str) -> list[float]:  # the buckets', then the window's
        return [*rows[(name, w)][f"{metric}_by_bucket"], rows[(name, w)][metric]]

    table = []
    for name in names:
        scored = [w for w in range(windows) if (name, w) in rows]
        kl = np.array([scores(name, w, "kl") for w in scored])  # [windows, buckets + 1]
        nll = np.array([scores(name, w, "nll") for w in scored])
        bucket = rows[(name, scored[0])]["bucket"]
        buckets = kl.shape[1] - 1
        for b in range(buckets + 1):
            span = "bucket" if b < buckets else "all"
            row = dict(model=name, span=span, first_position=b * bucket if b < buckets else 0,
                       last_position=(b + 1) * bucket - 1 if b < buckets else buckets * bucket - 1,
                       windows=len(scored), kl=float(kl[:, b].mean()),
                       kl_ci95=statistics.interval_half_width(kl[:, b]) or 0.0,
                       loss=float(nll[:, b].mean()), loss_ci95=statistics.interval_half_width(nll[:, b]) or 0.0)
            for metric in ("kl", "nll") if name != names[0] else ():
                ours = {w: scores(name, w, metric)[b] for w in scored}
                first = {w: scores(names[0], w, metric)[b] for w in range(windows) if (names[0], w) in rows}
                difference = statistics.paired_difference(ours, first)
                label = "kl" if metric == "kl" else "loss"
                row.update({f"{label}_diff": difference["mean"], f"{label}_diff_ci95": difference["ci95"],
                            f"{label}_diff_p": difference["p"]})
            table.append(row)
    return table


def plot(table: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (kl_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 5))
    names = list(dict.fromkeys(r["model"] for r in table))
    for i, name in enumerate(names):
        rows = [r for r in table if r["model"] == name and r["span"] == "bucket"]
        middle = [(r["first_position"] + r["last_position"] + 1) / 2 for r in rows]
        kl_ax.errorbar(middle, [r["kl"] for r in rows], yerr=[r["kl_ci95"] for r in rows],
                       marker="o", capsize=3, label=name, color=f"C{i}")
        if i:
            loss_ax.errorbar(middle, [r["loss_diff"] for r in rows], yerr=[r["loss_diff_ci95"] for r in rows],
                             marker="o", capsize=3, label=name, color=f"C{i}")
    loss_ax.axhline(0, color="C0", lw=1)
    kl_ax.set_ylabel("KL(original || model), nats/token")
    loss_ax.set_ylabel(f"loss - {names[0]}'s, nats/token (paired by window)")
    for ax in (kl_ax, loss_ax):
        ax.set_xlabel("position in the window (bucket middle)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("By position: mean over held-out windows, 95% intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/retrofit")
    parser.add_argument("--source", help="the original's workdir (default: WORKDIR's SmolLM2)")
    parser.add_argument("--models", nargs="+", required=True,
                        help="models as retrofit.py's tables name them; differences are from the first")
    parser.add_argument("--text", default=str(retrofit.TEXT))
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--bucket", type=int, default=256, help="positions averaged together")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--table", default="positions",
                        help="the results' name: TABLE.{csv,json,md,png} (the scores file is shared)")
    args = parser.parse_args(argv)
    if args.bucket < 1 or args.seq_len % args.bucket:
        sys.exit(f"error: --bucket={args.bucket}: a positive divisor of --seq_len={args.seq_len}")
    out = pathlib.Path(args.out)
    rows_path = out / "positions_windows.jsonl"
    other = {row.get("bucket") for row in retrofit.load_rows(rows_path, args.seq_len).values()} - {args.bucket}
    if other:
        sys.exit(f"error: --bucket={args.bucket}: {rows_path} holds scores by buckets of {other.pop()} "
                 "positions; pass that --bucket, or another --out")
    workdir = pathlib.Path(args.workdir)
    source = retrofit.source_workdir(workdir, args.source)
    paths = {name: model_path(workdir, name, source) for name in args.models}
    original = load_model(source)
    loaders = {"original": lambda: original}
    loaders.update({name: functools.partial(load_model, path) for name, path in paths.items() if name != "original"})
    windows = retrofit.heldout_windows(original, pathlib.Path(args.text), args.windows, args.seq_len)
    rows = retrofit.score(loaders, args.models, windows, rows_path, bucket=args.bucket)
    table = by_bucket(rows, args.models, len(windows))
    for row in table:  # the columns as the table prints them
        row["positions"] = "all" if row["span"] == "all" else f"{row['first_position']}-{row['last_position']}"
        for label in ("kl", "loss"):
            row[f"{label}_diff_text"] = (f"{row[f'{label}_diff']:+.4f} ± {row[f'{label}_diff_ci95']:.4f} "
                                         f"(p {row[f'{label}_diff_p']:.2g})" if f"{label}_diff" in row else "")
    retrofit.publish(out, args.table, table, {
        "model": "{model}", "positions": "{positions}",
        "KL": "{kl:.4f} ± {kl_ci95:.4f}", "loss": "{loss:.4f} ± {loss_ci95:.4f}",
        "KL - first": "{kl_diff_text}", "loss - first": "{loss_diff_text}"},
        intro=f"KL(original || model) and loss by position, mean over {len(windows)} held-out windows of "
        f"{args.seq_len} tokens with a 95% t-interval; the last two columns: the differences from the first "
        f"model, {args.models[0]!r}, paired by window (p: paired t-test, uncorrected).",
        windows=len(windows), seq_len=args.seq_len, bucket=args.bucket, text=pathlib.Path(args.text).name,
        source=str(source))
    plot(table, out / f"{args.table}.png")


if __name__ == "__main__":
    main()
