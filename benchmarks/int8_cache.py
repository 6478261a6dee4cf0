"""What an int8 KV cache costs in held-out loss, on trained models, with seed-paired intervals.

  python benchmarks/int8_cache.py --runs=runs/kv_sweep --configurations=MHA,MQA

For every trained workdir CONFIGURATION__seed=N under --runs (as `sweep.py` leaves them),
scores the whole held-out split three ways, in the same windows (`eval.py`'s): the model's
own forward pass, cached decoding with the float cache (each window prefilled into an
empty cache: `eval.py --cached`), and cached decoding with `model.kv_cache_dtype=int8`.
Reports the int8 cache's loss change against the float cache per configuration, mean and
95% t-interval over the seeds (paired by model). Writes benchmarks/results/int8_cache/int8_cache.{csv,json,md}.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import mqa  # noqa: E402
from benchmarks.common import RESULTS, write_results  # noqa: E402
from mqa import data, evaluation, statistics  # noqa: E402


def held_out_losses(workdir: pathlib.Path) -> dict:
    """{"forward", "float_cache", "int8_cache"}: held-out loss (nats/token) three ways."""
    float_model = mqa.load_model(workdir)
    int8_model = mqa.load_model(workdir, overrides={"model.kv_cache_dtype": "int8"})
    config = float_model.config
    corpus = data.load_corpus(config.data, workdir / "data", min_tokens=config.train.seq_len + 1)
    score = lambda model, cached: evaluation.evaluate_tokens(  # noqa: E731
        model, corpus.heldout, seq_len=config.train.seq_len, batch_size=16, progress=False,
        cached=cached)["loss"]
    return {"forward": score(float_model, False), "float_cache": score(float_model, True),
            "int8_cache": score(int8_model, True)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=pathlib.Path, default=pathlib.Path("runs/kv_sweep"))
    parser.add_argument("--configurations", default="MHA,MQA",
                        help="comma-separated configuration names (the part before __seed=)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "int8_cache")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configurations.split(",") if n.strip()]
    rows, summary = [], []
    for name in names:
        workdirs = sorted((p for p in args.runs.glob(f"{name}__seed=*")
                           if re.fullmatch(rf"{re.escape(name)}__seed=\d+", p.name)),
                          key=lambda p: int(p.name.rpartition("=")[2]))
        if not workdirs:
            parser.error(f"--configurations: no {name}__seed=N workdirs under {args.runs}")
        for workdir in workdirs:
            losses = held_out_losses(workdir)
            rows.append(dict(configuration=name, seed=int(workdir.name.rpartition("=")[2]), **losses,
                             int8_minus_float=losses["int8_cache"] - losses["float_cache"]))
            print(rows[-1], flush=True)
        diffs = [r["int8_minus_float"] for r in rows if r["configuration"] == name]
        gaps = [r["float_cache"] - r["forward"] for r in rows if r["configuration"] == name]
        summary.append(dict(configuration=name, seeds=len(diffs),
                            float_cache_minus_forward_max=max(map(abs, gaps)),
                            **{f"int8_minus_float_{k}": v
                               for k, v in statistics.summarize(diffs).items()}))
        print(summary[-1], flush=True)
    write_results(args.out, "int8_cache", rows, summary=summary)
    lines = ["| configuration | seeds | int8 cache - float cache (nats/token), mean +- 95% | "
             "max abs(float cache - forward) |", "|---|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['configuration']} | {s['seeds']} | {s['int8_minus_float_mean']:+.5f} "
                     f"+- {s['int8_minus_float_ci95']:.5f} | "
                     f"{s['float_cache_minus_forward_max']:.1e} |")
    (args.out / "int8_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
