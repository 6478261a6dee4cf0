"""Uptraining (Ainslie et al. 2023): an MHA checkpoint turned into GQA/MQA and trained a
little more, against the same shapes trained from scratch.

  python benchmarks/uptrain.py --mha=runs/kv_sweep/MHA__seed=0 --workdir=runs/uptrain

--mha is a finished MHA run of configs/sweep_kv_heads.py (the sweep's MHA point of one
seed: with 8 K/V heads nothing is widened, so it is the plain MHA model). For each
--kv_heads K and --inits method this converts it (`python -m mqa.convert uptrain`) and
trains --fraction of the source's steps more from it; for each K it also trains the
K-head model (MLP not widened: the uptrained shapes) from scratch for the source's number
of steps. Every run goes through sweep.py, so each is resumable and timed decoding the
same way, and every model, the converted ones before training too, is evaluated by
eval.py on the whole held-out split. Writes WORKDIR/uptrain.{csv,md,json}
and benchmarks/results/uptrain/uptrain.{csv,md,json}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, write_results  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/sweep_kv_heads.py"


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def train(workdir: pathlib.Path, kv_heads: int, overrides: list[str]) -> dict:
    """One single-point sweep.py run (K heads, MLP not widened): its decoding speed and
    eval.py's metrics of its final model."""
    run("sweep.py", f"--config={CONFIG}", f"--workdir={workdir}",
        f"--sweep=model.num_kv_heads={kv_heads}", "--config.model.match_mha_params=false",
        *overrides)
    point = workdir / f"num_kv_heads={kv_heads}"
    return {**json.loads((point / "result.json").read_text()), **speeds(point), **evaluate(point)}


def speeds(point: pathlib.Path) -> dict:
    """The point's configuration's side-by-side speeds from its sweep's speeds.json
    ({"decode": ...}), or {} if the sweep has none."""
    path = point.parent / "speeds.json"
    configuration = point.name.split("__seed=")[0]
    return json.loads(path.read_text()).get(configuration, {}) if path.exists() else {}


def evaluate(workdir: pathlib.Path) -> dict:
    """eval.py's held-out metrics of a workdir (its last line is one JSON object)."""
    print("+ eval.py", f"--workdir={workdir}", flush=True)
    done = subprocess.run([sys.executable, "eval.py", f"--workdir={workdir}"], cwd=REPO,
                          check=True, capture_output=True, text=True)
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    return {f"eval_{k}": v for k, v in metrics.items()}


def row(name: str, kv_heads: int, steps: int, result: dict) -> dict:
    return dict(run=name, num_kv_heads=kv_heads, train_steps=steps,
                eval_loss=result["eval_loss"], eval_perplexity=result["eval_perplexity"],
                eval_bits_per_byte=result["eval_bits_per_byte"],
                decode_tokens_per_sec=(result.get("decode") or {}).get("tokens_per_sec"))


def _format(column: str, value) -> str:
    if value is None:
        return ""
    if column == "decode_tokens_per_sec":
        return f"{value:,.0f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mha", type=pathlib.Path, required=True)
    parser.add_argument("--workdir", type=pathlib.Path, required=True)
    parser.add_argument("--kv_heads", type=lambda t: [int(x) for x in t.split(",")],
                        default=[2, 1])
    parser.add_argument("--inits", type=lambda t: t.split(","), default=["mean", "first", "random"])
    parser.add_argument("--fraction", type=float, default=0.1,
                        help="uptraining steps as a fraction of the source's")
    parser.add_argument("--learning_rate", type=float, default=5e-4,
                        help="peak learning rate of uptraining (cosine to 10%% after warmup)")
    parser.add_argument("--warmup_steps", type=int, default=5)
    args = parser.parse_args(argv)

    source = {**json.loads((args.mha / "result.json").read_text()), **speeds(args.mha),
              **evaluate(args.mha)}
    steps = source["step"]
    up_steps = max(1, round(args.fraction * steps))
    rows = [row("MHA (source)", 8, steps, source)]
    for kv in args.kv_heads:
        for init in args.inits:
            init_dir = args.workdir / f"init_kv{kv}_{init}"
            if not (init_dir / "checkpoints").exists():
                run("-m", "mqa.convert", "uptrain", "--src", str(args.mha), "--num_kv_heads",
                    str(kv), "--init", init, "--workdir", str(init_dir))
            rows.append(row(f"converted ({init}), not trained", kv, steps, evaluate(init_dir)))
            result = train(args.workdir / f"uptrained_kv{kv}_{init}", kv, [
                f"--config.train.init_from={init_dir}", f"--config.train.steps={up_steps}",
                f"--config.train.warmup_steps={args.warmup_steps}",
                f"--config.train.learning_rate={args.learning_rate}",
                f"--config.train.eval_every={up_steps}", f"--config.checkpoint.every={up_steps}"])
            rows.append(row(f"uptrained ({init})", kv, steps + up_steps, result))
        scratch = train(args.workdir / f"scratch_kv{kv}", kv, [f"--config.train.steps={steps}"])
        rows.append(row("from scratch", kv, steps, scratch))

    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_format(k, v) for k, v in r.items()) + " |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    for out in (args.workdir, RESULTS / "uptrain"):
        out.mkdir(parents=True, exist_ok=True)
        (out / "uptrain.md").write_text(table)
        write_results(out, "uptrain", rows, source=str(args.mha), uptrain_steps=up_steps,
                      uptrain_learning_rate=args.learning_rate, warmup_steps=args.warmup_steps)


if __name__ == "__main__":
    main()
