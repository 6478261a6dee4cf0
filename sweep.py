"""Train one model per point of a sweep (e.g. over model.num_kv_heads and seeds) and
tabulate them with error bars.

  python sweep.py --config=configs/sweep_kv_heads.py --workdir=runs/kv_sweep --seeds=4
  python sweep.py --config=configs/tiny.py --workdir=runs/tiny_sweep \
      --sweep=model.num_kv_heads=2,1 --seeds=3 --baseline=model.num_kv_heads=2

The config's `sweep` field (or the --sweep flags, which replace it) lists the values of
each field; the points are their cartesian product, with train.seed = 0..N-1 as one more
field under --seeds=N. A point without its seed is a *configuration*. Every --config.*
override applies to every point. Each point is an ordinary resumable training run in
WORKDIR/<point name> (e.g. WORKDIR/num_kv_heads=8__seed=0), trained in this process one
after another, seed 0 of every configuration first, so that an interrupted sweep leaves
complete seed pairs; running the same command again skips finished points and resumes an
interrupted one. Then every configuration's train step and decoding (--decode_batch
sequences at --decode_context tokens) are timed side by side in alternating rounds, and
the sweep writes:

  WORKDIR/results.csv, results.md   a row per configuration: held-out loss and bits per
                                    byte as mean, sd and 95% interval over seeds, and the
                                    seed-paired difference against --baseline with its
                                    interval (columns: mqa/sweep_results.py)
  WORKDIR/results_by_seed.csv       a row per point (configuration and seed)
  WORKDIR/comparisons.csv           with --compare=A:B, the seed-paired difference A - B
                                    and A's KV-cache and decoding-speed ratios to B
  WORKDIR/speeds.json               the side-by-side timings, per configuration
  WORKDIR/eval_loss.png             held-out loss (mean, 95% interval) against num_kv_heads
                                    (or the first field); eval_loss_diff.png the paired
                                    difference against the baseline
  WORKDIR/decode_tokens_per_sec.png decoding tokens/s against the same field
  WORKDIR/loss_curves.png           train and held-out loss against step, all points
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from mqa import sweep_plots, sweep_results, trainer
from mqa.cli import fail, parse_flags
from mqa.config import ConfigError, ModelConfig, build_model_config
from mqa.data import DataError
from mqa.loading import load_model
from mqa.sweep import (POINTS_FIELD, SEED_FIELD, Point, parse_sweep_flags, points,
                       sweep_fields, with_seeds)
from mqa.timing import alternating_medians, decode_loop, timed, train_loop
from mqa.workdir import RESUMABLE_CHANGES, CheckpointError, prepare_workdir, saved_config

DECODE_STEPS = 32    # cached decoding steps per timing
TRAIN_STEPS = 3      # train steps per timing
TIMING_ROUNDS = 5    # alternating rounds; the median is reported
SPEEDS_FILE = "speeds.json"

config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/sweep_*.py), or "
                                "any training config together with --sweep.")
flags.DEFINE_string("workdir", None, "Directory for the sweep: one sub-workdir per point.",
                    required=True)
flags.DEFINE_multi_string("sweep", [], "FIELD=V1,V2,... (repeat for more fields); replaces the "
                          "config's sweep field, e.g. --sweep=model.num_kv_heads=8,4,2,1")
flags.DEFINE_integer("seeds", None, "Train every configuration with train.seed = 0..N-1 and "
                     "report means, intervals and seed-paired differences.")
flags.DEFINE_multi_string("baseline", [], "FIELD=VALUE (repeat for more fields): the "
                          "configuration the others are compared with; default: the first.")
flags.DEFINE_multi_string("compare", [], "CONFIGURATION:AGAINST (repeatable), e.g. "
                          "--compare=GTA-2:GQA-2: also report that seed-paired difference "
                          "(comparisons.csv and results.md).")
flags.DEFINE_integer("decode_context", 1024, "Tokens in the KV cache while timing decoding "
                     f"(capped at model.max_seq_len - {DECODE_STEPS}).", lower_bound=1)
flags.DEFINE_integer("decode_batch", 8, "Sequences decoded at once while timing.", lower_bound=1)
FLAGS = flags.FLAGS


def _without(snapshot: dict, fields) -> dict:
    """A config snapshot without the dotted `fields`."""
    snapshot = json.loads(json.dumps(snapshot))
    for field in fields:
        section, key = field.split(".")
        snapshot[section].pop(key, None)
    return snapshot


def _value(point: Point, field: str):
    section, key = field.split(".")
    return point.config[section][key]


def training_twin(point: Point, plan: list[Point], workdir) -> Point | None:
    """A finished point of the plan that trained exactly as `point` would (their configs
    differ only in `mqa.workdir.RESUMABLE_CHANGES`, such as the KV cache's dtype), or None."""
    def training_part(p: Point) -> dict:
        return _without(sweep_results.config_snapshot(p), RESUMABLE_CHANGES)

    mine = training_part(point)
    return next((other for other in plan if other.name != point.name
                 and training_part(other) == mine
                 and sweep_results.finished_result(workdir / other.name, other) is not None), None)


def train_point(point: Point, plan: list[Point], workdir, label: str) -> dict:
    """Trains (or resumes) a point unless it has finished; returns its result.json contents.
    A point whose training twin has finished copies the twin's run and is only evaluated."""
    point_dir = workdir / point.name
    result = sweep_results.finished_result(point_dir, point)
    if result is not None:
        print(f"{label}: finished (step {result['step']}), skipped", flush=True)
        return result
    twin = None if (point_dir / "checkpoints").exists() else training_twin(point, plan, workdir)
    if twin is not None:
        differ = [f for f in RESUMABLE_CHANGES if _value(point, f) != _value(twin, f)]
        print(f"{label}: trains exactly as {twin.name} (they differ only in {', '.join(differ)}); "
              f"evaluating a copy of its run in {point_dir}", flush=True)
        shutil.copytree(workdir / twin.name, point_dir, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(sweep_results.RESULT_FILE, "*.lock"))
    else:
        print(f"{label}: training in {point_dir}", flush=True)
    config = ml_collections.ConfigDict(point.config.to_dict())  # train() may change it (BPE)
    trained = trainer.train(config, point_dir)
    result = sweep_results.new_result(point, trained)
    sweep_results.write_result(point_dir, result)
    return result


def time_speeds(representatives: dict[str, Point], workdir, context: int,
                batch: int) -> dict[str, dict]:
    """Train-step and decoding tokens/s of each configuration, by name: every train step
    and decoding loop compiled first (decoding with the trained weights of the
    configuration's first point), then all timed side by side in alternating rounds."""
    runs, used, tokens = {}, {}, {}
    for name, point in representatives.items():
        train_run, tokens[name] = train_loop(point.config, TRAIN_STEPS)
        train_run()  # compile
        runs[("train", name)] = timed(train_run)
        model = load_model(workdir / point.name)
        limit = model.model_config.max_seq_len - DECODE_STEPS
        used[name] = min(context, limit)
        if used[name] < context:
            print(f"{name}: decode context {context} capped to {limit} (model.max_seq_len="
                  f"{model.model_config.max_seq_len} minus {DECODE_STEPS} timed steps)")
        decode_run, _, _ = decode_loop(model.graphdef, model.params, model.model_config, batch,
                                       used[name], DECODE_STEPS)
        decode_run()  # compile
        runs[("decode", name)] = timed(decode_run)
    medians = alternating_medians(runs, TIMING_ROUNDS)
    speeds = {}
    for name, point in representatives.items():
        train_rate = tokens[name] / medians[("train", name)]
        decode_rate = batch * DECODE_STEPS / medians[("decode", name)]
        print(f"{name}: training {train_rate:,.0f} tokens/s, decoding {decode_rate:,.0f} "
              f"tokens/s (batch {batch}, context {used[name]})", flush=True)
        speeds[name] = {"train_tokens_per_sec": train_rate,
                        "config_sha256": config_digest(point),
                        "decode": {"context": used[name], "batch": batch, "steps": DECODE_STEPS,
                                   "tokens_per_sec": decode_rate, "requested_context": context}}
    return speeds


def config_digest(point: Point) -> str:
    """sha256 of the point's training config (as JSON): what its speeds were measured for,
    without writing the config (and its local paths) into speeds.json."""
    text = json.dumps(sweep_results.config_snapshot(point), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def measured_speeds(plan: list[Point], workdir, context: int, batch: int) -> dict[str, dict]:
    """The configurations' speeds from WORKDIR/speeds.json, all re-timed side by side when
    any configuration is new, was trained with another config, or the decode settings
    differ: speeds are only compared when they were measured together."""
    representatives = {}
    for point in plan:
        representatives.setdefault(point.configuration, point)
    path = workdir / SPEEDS_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    current = all(
        name in saved and saved[name].get("config_sha256") == config_digest(point)
        and (saved[name]["decode"]["requested_context"], saved[name]["decode"]["batch"])
        == (context, batch) for name, point in representatives.items())
    if current:
        return saved
    speeds = time_speeds(representatives, workdir, context, batch)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(speeds, indent=2) + "\n")
    tmp.replace(path)
    return speeds


def baseline_configuration(plan: list[Point], items: list[str], config) -> str:
    """The configuration --baseline names (FIELD=VALUE pairs, read like --sweep values),
    or the first one; one line naming the choices when it is not a configuration."""
    if not items:
        return plan[0].configuration
    wanted = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise ConfigError(f"--baseline={item!r} must look like 'section.field=value'")
        if name.strip() == POINTS_FIELD:
            wanted[POINTS_FIELD] = text.strip()
            continue
        wanted.update({key: values[0] for key, values in
                       parse_sweep_flags([item], config).items()})
    matches = []
    for point in plan:
        values = {key: value["name"] if key == POINTS_FIELD else value
                  for key, value in point.values.items()}
        if all(key in values and values[key] == value for key, value in wanted.items()):
            if point.configuration not in matches:
                matches.append(point.configuration)
    if len(matches) != 1:
        configurations = list(dict.fromkeys(point.configuration for point in plan))
        what = "matches no configuration" if not matches else f"matches {len(matches)} configurations"
        raise ConfigError(f"--baseline {' '.join(items)} {what}; the configurations are: "
                          f"{', '.join(configurations)}")
    return matches[0]


def compared_pairs(plan: list[Point], items: list[str]) -> list[tuple[str, str]]:
    """--compare's CONFIGURATION:AGAINST pairs, each a configuration of the plan; one line
    naming the configurations when one is not."""
    configurations = list(dict.fromkeys(point.configuration for point in plan))
    pairs = []
    for item in items:
        name, sep, against = (part.strip() for part in item.partition(":"))
        for part in (name, against):
            if not sep or part not in configurations:
                raise ConfigError(f"--compare={item!r} must be CONFIGURATION:AGAINST, two of: "
                                  f"{', '.join(configurations)}")
        pairs.append((name, against))
    return pairs


def run_sweep(config: ml_collections.ConfigDict, workdir) -> str:
    """Trains and times every point, writes the tables and figures; returns the markdown."""
    fields = parse_sweep_flags(FLAGS.sweep, config) if FLAGS.sweep else sweep_fields(config)
    if FLAGS.seeds is not None:
        fields = with_seeds(fields, FLAGS.seeds)
    plan = points(config, fields)  # every point validated before anything trains
    baseline = baseline_configuration(plan, FLAGS.baseline, config)
    comparisons = compared_pairs(plan, FLAGS.compare)  # checked before anything trains
    workdir = prepare_workdir(workdir)
    # Seed-major order: every configuration's seed 0, then seed 1, ...
    order = sorted(plan, key=lambda point: point.seed)
    print(f"sweep: {len(plan)} points in {workdir}: {', '.join(p.name for p in order)}", flush=True)
    results = {point.name: train_point(point, plan, workdir,
                                       f"[{index}/{len(plan)}] {point.name}")
               for index, point in enumerate(order, 1)}
    speeds = measured_speeds(plan, workdir, FLAGS.decode_context, FLAGS.decode_batch)
    seed_rows, curves = [], {}
    for point in plan:
        point_dir, result = workdir / point.name, results[point.name]
        model_config = build_model_config(saved_config(point_dir).model)
        seed_rows.append(sweep_results.seed_row(point, result, model_config,
                                                speeds[point.configuration]))
        curves.setdefault(point.configuration, []).append(
            sweep_results.loss_curves(sweep_results.read_metrics(point_dir)))
    rows = sweep_results.configuration_rows(seed_rows, baseline)

    columns = sweep_results.configuration_columns(fields)
    table = sweep_results.markdown_table(rows, columns)
    sweep_results.write_csv(rows, columns, workdir / "results.csv")
    sweep_results.write_csv(seed_rows, sweep_results.seed_columns(fields),
                            workdir / "results_by_seed.csv")
    if comparisons:
        compared = sweep_results.comparison_rows(seed_rows, comparisons)
        sweep_results.write_csv(compared, list(sweep_results.COMPARISON_COLUMNS),
                                workdir / "comparisons.csv")
        table += ("\nSeed-paired differences in held-out loss (configuration minus against, "
                  "95% interval), and the ratios of KV-cache bytes and decoding speed:\n\n"
                  + sweep_results.markdown_table(compared, list(sweep_results.COMPARISON_COLUMNS)))
    (workdir / "results.md").write_text(
        f"Baseline: {baseline}. Means over seeds with 95% t intervals (half-widths); "
        "differences are seed-paired against the baseline; resolved: the difference's "
        "interval excludes zero.\n\n" + table)
    swept = [name for name in fields if name != SEED_FIELD]
    x = ("num_kv_heads" if "model.num_kv_heads" in swept
         else "configuration" if not swept or swept[0] == POINTS_FIELD else swept[0])
    series = [name for name in swept if name not in ("model.num_kv_heads", x, POINTS_FIELD)]
    sweep_plots.plot_metric(rows, x, "eval_loss_mean", series, workdir / "eval_loss.png",
                            error="eval_loss_ci95", ylabel="held-out loss (nats/token)",
                            title=f"held-out loss, mean and 95% interval over "
                            f"{'/'.join(sorted({str(r['n']) for r in rows}))} seeds")
    sweep_plots.plot_metric(rows, x, "eval_loss_diff", series, workdir / "eval_loss_diff.png",
                            error="eval_loss_diff_ci95", zero_line=True,
                            ylabel="difference in held-out loss (nats/token)",
                            title=f"seed-paired difference against {baseline}, 95% interval")
    sweep_plots.plot_metric(rows, x, "decode_tokens_per_sec", series,
                            workdir / "decode_tokens_per_sec.png", ylabel="tokens/s",
                            title=f"decoding, batch {FLAGS.decode_batch}, context "
                            f"{'/'.join(sorted({str(r['decode_context']) for r in rows}))}")
    sweep_plots.plot_loss_curves(curves, workdir / "loss_curves.png")
    context = "/".join(sorted({str(r["decode_context"]) for r in rows}))
    sweep_plots.plot_frontier(rows, "eval_loss_mean", workdir / "frontier.png", error="eval_loss_ci95",
                              ylabel="held-out loss (nats/token), mean and 95% interval",
                              title=f"held-out loss against KV cache (at context {context})")
    sweep_plots.plot_frontier(rows, "decode_tokens_per_sec", workdir / "frontier_decode.png",
                              lower_is_better=False, ylabel="decoding tokens/s",
                              title=f"decoding, batch {FLAGS.decode_batch}, context {context}")
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
    print(f"wrote {FLAGS.workdir}/results.csv, results.md, results_by_seed.csv, eval_loss.png, "
          "eval_loss_diff.png, decode_tokens_per_sec.png, loss_curves.png, frontier.png and "
          "frontier_decode.png")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
