"""Which heads to merge: MHA -> GQA with adjacent heads pooled, against heads grouped by
how alike their attention patterns are, before and after uptraining, over several seeds.

  python benchmarks/head_grouping.py --mha=runs/kv_sweep/MHA__seed=0,runs/kv_sweep/MHA__seed=1 \
      --workdir=runs/head_grouping --num_kv_heads=2

For each MHA run given (e.g. the KV-head sweep's MHA model at each seed) and each grouping
(`mqa.convert uptrain --group adjacent|similarity`, mean-pooled), evaluates the converted
model on the whole held-out split (eval.py), uptrains it for --fraction of the source's
steps (as benchmarks/uptrain.py does) and evaluates it again. The sources are the pairing
unit: the table gives each grouping's mean loss with its 95% interval and the paired
difference similarity - adjacent with its interval (`mqa.statistics`). Writes
WORKDIR/head_grouping.{md,csv,json} and benchmarks/results/head_grouping/head_grouping.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, write_results  # noqa: E402
from benchmarks.uptrain import evaluate, run, train  # noqa: E402
from mqa import statistics  # noqa: E402

GROUPINGS = ("adjacent", "similarity")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mha", type=lambda t: [pathlib.Path(p) for p in t.split(",")],
                        required=True, help="comma-separated finished MHA runs")
    parser.add_argument("--workdir", type=pathlib.Path, required=True)
    parser.add_argument("--num_kv_heads", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--warmup_steps", type=int, default=5)
    args = parser.parse_args(argv)

    rows = []
    for source in args.mha:
        before = evaluate(source)
        steps = _steps(source)
        up_steps = max(1, round(args.fraction * steps))
        for grouping in GROUPINGS:
            name = f"{source.name}_{grouping}"
            init_dir = args.workdir / f"init_{name}"
            if not (init_dir / "checkpoints").exists():
                run("-m", "mqa.convert", "uptrain", "--src", str(source), "--num_kv_heads",
                    str(args.num_kv_heads), "--group", grouping, "--workdir", str(init_dir))
            converted = evaluate(init_dir)
            uptrained = train(args.workdir / f"uptrained_{name}", args.num_kv_heads, [
                f"--config.train.init_from={init_dir}", f"--config.train.steps={up_steps}",
                f"--config.train.warmup_steps={args.warmup_steps}",
                f"--config.train.learning_rate={args.learning_rate}",
                f"--config.train.eval_every={up_steps}", f"--config.checkpoint.every={up_steps}",
                f"--config.train.seed={_seed(source)}"])
            rows.append(dict(source=str(source), grouping=grouping, mha_loss=before["eval_loss"],
                             converted_loss=converted["eval_loss"],
                             uptrained_loss=uptrained["eval_loss"], uptrain_steps=up_steps))

    summary = []
    for grouping in GROUPINGS:
        mine = [r for r in rows if r["grouping"] == grouping]
        line = {"grouping": grouping, "n": len(mine)}
        for key in ("converted_loss", "uptrained_loss"):
            stats = statistics.summarize([r[key] for r in mine])
            diff = statistics.paired_difference(
                {r["source"]: r[key] for r in mine},
                {r["source"]: r[key] for r in rows if r["grouping"] == "adjacent"})
            line.update({f"{key}_mean": stats["mean"], f"{key}_ci95": stats["ci95"],
                         f"{key}_diff": diff["mean"], f"{key}_diff_ci95": diff["ci95"],
                         f"{key}_diff_resolved": diff["resolved"]})
        summary.append(line)
    mha = statistics.summarize([r["mha_loss"] for r in rows if r["grouping"] == "adjacent"])

    table = markdown(summary, mha, len(args.mha))
    print("\n" + table)
    for out in (args.workdir, RESULTS / "head_grouping"):
        out.mkdir(parents=True, exist_ok=True)
        (out / "head_grouping.md").write_text(table)
        write_results(out, "head_grouping", rows, summary=summary, mha=mha,
                      num_kv_heads=args.num_kv_heads, learning_rate=args.learning_rate,
                      warmup_steps=args.warmup_steps, fraction=args.fraction)


def markdown(summary: list[dict], mha: dict, sources: int) -> str:
    """The summary as a markdown table: means and differences (signed) with their 95%
    interval half-widths, and whether each difference's interval excludes zero."""
    def cell(column: str, value) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:+.4f}" if column.endswith("_diff") else f"{value:.4f}"
        return str(value)

    columns = list(summary[0])
    lines = [f"MHA sources: {sources}, held-out loss {mha['mean']:.4f}"
             + (f" +- {mha['ci95']:.4f}" if mha["ci95"] else ""), "",
             "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(cell(c, line[c]) for c in columns) + " |" for line in summary]
    return "\n".join(lines) + "\n"


def _seed(source: pathlib.Path) -> int:
    return int(json.loads((source / "config.json").read_text())["train"]["seed"])


def _steps(source: pathlib.Path) -> int:
    return int(json.loads((source / "result.json").read_text())["step"])


if __name__ == "__main__":
    main()
