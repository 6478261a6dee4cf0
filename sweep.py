"""Train one model per point of a sweep (e.g. over model.num_kv_heads) and tabulate them.

  python sweep.py --config=configs/sweep_kv_heads.py --workdir=runs/kv_sweep
  python sweep.py --config=configs/tiny.py --workdir=runs/tiny_sweep \
      --sweep=model.num_kv_heads=2,1 --sweep=train.seed=0,1 --config.train.steps=100

The config's `sweep` field (or the --sweep flags, which replace it) lists the values of
each field; the points are their cartesian product. Every --config.* override applies to
every point. Each point is an ordinary resumable training run in WORKDIR/<point name>
(e.g. WORKDIR/num_kv_heads=8), trained in this process one after another; running the
same command again skips finished points and resumes an interrupted one. Then the points'
final models are timed decoding side by side (--decode_batch sequences at
--decode_context tokens, in alternating rounds), and the sweep writes:

  WORKDIR/results.csv, results.md   a row per point (columns: mqa/sweep_results.py)
  WORKDIR/eval_loss.png             held-out loss against num_kv_heads (or the first field)
  WORKDIR/decode_tokens_per_sec.png decoding tokens/s against the same field
  WORKDIR/loss_curves.png           train and held-out loss against step, all points
"""

from __future__ import annotations

import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from mqa import sweep_plots, sweep_results, trainer
from mqa.cli import fail, parse_flags
from mqa.config import ConfigError, ModelConfig
from mqa.data import DataError
from mqa.loading import CheckpointError, load_model
from mqa.sweep import Point, parse_sweep_flags, points, sweep_fields
from mqa.timing import alternating_medians, decode_loop, timed

DECODE_STEPS = 32    # cached decoding steps per timing
DECODE_REPEATS = 5   # timings per point; the median is reported

config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/sweep_*.py), or "
                                "any training config together with --sweep.")
flags.DEFINE_string("workdir", None, "Directory for the sweep: one sub-workdir per point.",
                    required=True)
flags.DEFINE_multi_string("sweep", [], "FIELD=V1,V2,... (repeat for more fields); replaces the "
                          "config's sweep field, e.g. --sweep=model.num_kv_heads=8,4,2,1")
flags.DEFINE_integer("decode_context", 1024, "Tokens in the KV cache while timing decoding "
                     f"(capped at model.max_seq_len - {DECODE_STEPS}).", lower_bound=1)
flags.DEFINE_integer("decode_batch", 8, "Sequences decoded at once while timing.", lower_bound=1)
FLAGS = flags.FLAGS


def train_point(point: Point, point_dir, label: str) -> dict:
    """Trains (or resumes) a point unless it has finished; returns its result.json contents."""
    result = sweep_results.finished_result(point_dir, point)
    if result is not None:
        print(f"{label}: finished (step {result['step']}), skipped", flush=True)
        return result
    print(f"{label}: training in {point_dir}", flush=True)
    config = ml_collections.ConfigDict(point.config.to_dict())  # train() may change it (BPE)
    trained = trainer.train(config, point_dir)
    result = sweep_results.new_result(point, trained, sweep_results.read_metrics(point_dir))
    sweep_results.write_result(point_dir, result)
    return result


def time_decoding(point_dirs: dict[str, object], context: int, batch: int) -> dict[str, dict]:
    """Decoding tokens/s of each point's final model, by point name: every model compiled
    first, then all timed side by side in alternating rounds (median of DECODE_REPEATS)."""
    runs, used = {}, {}
    for name, point_dir in point_dirs.items():
        model = load_model(point_dir)
        limit = model.model_config.max_seq_len - DECODE_STEPS
        used[name] = min(context, limit)
        if used[name] < context:
            print(f"{name}: decode context {context} capped to {limit} (model.max_seq_len="
                  f"{model.model_config.max_seq_len} minus {DECODE_STEPS} timed steps)")
        run, _, _ = decode_loop(model.graphdef, model.params, model.model_config, batch,
                                used[name], DECODE_STEPS)
        run()  # compile
        runs[name] = timed(run)
    results = {}
    for name, seconds in alternating_medians(runs, DECODE_REPEATS).items():
        tokens_per_sec = batch * DECODE_STEPS / seconds
        print(f"{name}: decoding {tokens_per_sec:,.0f} tokens/s (batch {batch}, context "
              f"{used[name]})", flush=True)
        results[name] = {"context": used[name], "batch": batch, "steps": DECODE_STEPS,
                         "tokens_per_sec": tokens_per_sec, "requested_context": context}
    return results


def run_sweep(config: ml_collections.ConfigDict, workdir) -> str:
    """Trains and times every point, writes the tables and figures; returns the markdown."""
    fields = parse_sweep_flags(FLAGS.sweep, config) if FLAGS.sweep else sweep_fields(config)
    plan = points(config, fields)  # every point validated before anything trains
    workdir = trainer.prepare_workdir(workdir)
    print(f"sweep: {len(plan)} points in {workdir}: {', '.join(p.name for p in plan)}", flush=True)
    results = {point.name: train_point(point, workdir / point.name,
                                       f"[{index}/{len(plan)}] {point.name}")
               for index, point in enumerate(plan, 1)}
    # Decoding speeds are compared across points, so they are measured together: when any
    # point lacks a timing at these settings (a new or resumed point), all are re-timed.
    wanted = (FLAGS.decode_context, FLAGS.decode_batch)
    timed_as = lambda result: tuple((result.get("decode") or {}).get(key)  # noqa: E731
                                    for key in ("requested_context", "batch"))
    if any(timed_as(result) != wanted for result in results.values()):
        timings = time_decoding({point.name: workdir / point.name for point in plan}, *wanted)
        for point in plan:
            results[point.name]["decode"] = timings[point.name]
            sweep_results.write_result(workdir / point.name, results[point.name])
    rows, curves = [], {}
    for point in plan:
        point_dir, result = workdir / point.name, results[point.name]
        model_config = ModelConfig.from_config(trainer.saved_config(point_dir).model)
        rows.append(sweep_results.table_row(point, result, model_config))
        curves[point.name] = sweep_results.loss_curves(sweep_results.read_metrics(point_dir))

    columns = sweep_results.table_columns(fields)
    table = sweep_results.markdown_table(rows, columns)
    sweep_results.write_csv(rows, columns, workdir / "results.csv")
    (workdir / "results.md").write_text(table)
    x = "num_kv_heads" if "model.num_kv_heads" in fields else next(iter(fields))
    series = [name for name in fields if name not in ("model.num_kv_heads", x)]
    sweep_plots.plot_metric(rows, x, "eval_loss", series, workdir / "eval_loss.png",
                            ylabel="held-out loss (nats/token)", title="held-out loss")
    sweep_plots.plot_metric(rows, x, "decode_tokens_per_sec", series,
                            workdir / "decode_tokens_per_sec.png", ylabel="tokens/s",
                            title=f"decoding, batch {FLAGS.decode_batch}, context "
                            f"{'/'.join(sorted({str(r['decode_context']) for r in rows}))}")
    sweep_plots.plot_loss_curves(curves, workdir / "loss_curves.png")
    return table


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        if FLAGS.config is None:
            raise ConfigError("pass --config=configs/NAME.py, e.g. configs/sweep_kv_heads.py")
        table = run_sweep(FLAGS.config, FLAGS.workdir)
    except (ConfigError, DataError, CheckpointError, trainer.NonFiniteLoss) as error:
        fail(str(error))
    except trainer.Preempted as stop:
        print(stop, file=sys.stderr)
        sys.exit(143)
    print("\n" + table)
    print(f"wrote {FLAGS.workdir}/results.csv, results.md, eval_loss.png, "
          "decode_tokens_per_sec.png and loss_curves.png")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
