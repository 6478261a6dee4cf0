"""Running a sweep: every point trained (or resumed, or skipped when finished), every
configuration timed, and the tables and figures written (`run_sweep`, what `sweep.py`
does).

Each point is an ordinary resumable training run in WORKDIR/<point name>, trained in this
process one after another, seed 0 of every configuration first, so that an interrupted
sweep leaves complete seed pairs; running the same sweep again skips finished points
(`mqa.sweep.results.finished_result`) and resumes an interrupted one. A point whose
config differs from a finished point's only in `mqa.workdir.RESUMABLE_CHANGES` (how the model
is scored, not trained) copies that run and is only evaluated.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Iterable

import ml_collections

from mqa import trainer
from mqa import workdir as workdir_lib
from mqa.config import build_model_config, ConfigError, ModelConfig, get_dotted
from mqa.sweep import plots, results
from mqa.sweep.points import (Point, baseline_configuration, compared_pairs, parse_sweep_flags,
                              points, sweep_fields, with_seeds)
from mqa.sweep.speeds import measured_speeds


def run_sweep(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
              sweep: Iterable[str] = (), seeds: int | None = None,
              baseline: Iterable[str] = (), compare: Iterable[str] = (),
              decode_context: int = 1024, decode_batch: int = 8) -> str:
    """Trains and times every point of a sweep, writes its tables and figures in `workdir`;
    returns the markdown tables (as results.md holds them, after its baseline line).

    config: a training config with a `sweep` field (`mqa.sweep.points`), or any training
    config together with `sweep`: "FIELD=V1,V2,..." strings that replace that field, each
    value read like a `--config.FIELD=` override. seeds: train every configuration with
    train.seed = 0..seeds-1 (None: the seeds the sweep lists, if any). baseline:
    "FIELD=VALUE" strings naming the configuration the others are compared with (default:
    the first). compare: "CONFIGURATION:AGAINST" pairs to report as seed-paired
    differences (comparisons.csv). decode_context, decode_batch: the KV-cache length and
    the sequences of the decoding timing (the context capped at model.max_seq_len - 32).

    Every option and every point is checked before anything trains: a bad one is a
    one-line `ConfigError`. Training errors are the trainer's (`trainer.NonFiniteLoss`,
    `trainer.Preempted`, `DataError`, ...).
    """
    for name, value in (("decode_context", decode_context), ("decode_batch", decode_batch)):
        if value < 1:
            raise ConfigError(f"--{name}={value} must be >= 1")
    sweep = list(sweep)
    fields = parse_sweep_flags(sweep, config) if sweep else sweep_fields(config)
    if seeds is not None:
        fields = with_seeds(fields, seeds)
    plan = points(config, fields)  # every point validated before anything trains
    baseline = baseline_configuration(plan, baseline, config)
    comparisons = compared_pairs(plan, compare)
    workdir = workdir_lib.prepare_workdir(workdir)
    # Seed-major order: every configuration's seed 0, then seed 1, ...
    order = sorted(plan, key=lambda point: point.seed)
    print(f"sweep: {len(plan)} points in {workdir}: {', '.join(p.name for p in order)}", flush=True)
    finished = {point.name: train_point(point, plan, workdir, f"[{index}/{len(plan)}] {point.name}")
                for index, point in enumerate(order, 1)}
    speeds = measured_speeds(plan, workdir, decode_context, decode_batch)
    seed_rows, curves = [], {}
    for point in plan:
        point_dir = workdir / point.name
        model_config = build_model_config(workdir_lib.saved_config(point_dir).model)
        seed_rows.append(results.seed_row(point, finished[point.name], model_config,
                                          speeds[point.configuration]))
        curves.setdefault(point.configuration, []).append(
            results.loss_curves(results.read_metrics(point_dir)))
    rows = results.configuration_rows(seed_rows, baseline)
    table = results.write_tables(workdir, fields, seed_rows, rows, baseline, comparisons)
    plots.write_figures(workdir, fields, rows, curves, baseline, decode_batch)
    return table


def train_point(point: Point, plan: list[Point], workdir: pathlib.Path, label: str) -> dict:
    """Trains (or resumes) a point unless it has finished; returns its result.json contents.
    A point whose training twin has finished copies the twin's run and is only evaluated.
    label: how the progress lines name the point, e.g. "[3/10] MQA__seed=0"."""
    point_dir = workdir / point.name
    result = results.finished_result(point_dir, point)
    if result is not None:
        print(f"{label}: finished (step {result['step']}), skipped", flush=True)
        return result
    twin = None if (point_dir / "checkpoints").exists() else training_twin(point, plan, workdir)
    if twin is not None:
        differ = [field for field in workdir_lib.RESUMABLE_CHANGES
                  if get_dotted(point.config, field) != get_dotted(twin.config, field)]
        print(f"{label}: trains exactly as {twin.name} (they differ only in {', '.join(differ)}); "
              f"evaluating a copy of its run in {point_dir}", flush=True)
        shutil.copytree(workdir / twin.name, point_dir, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(results.RESULT_FILE, "*.lock"))
    else:
        print(f"{label}: training in {point_dir}", flush=True)
    config = ml_collections.ConfigDict(point.config.to_dict())  # train() may change it (BPE)
    trained = trainer.train(config, point_dir)
    result = results.new_result(point, trained)
    results.write_result(point_dir, result)
    return result


def training_twin(point: Point, plan: list[Point], workdir: pathlib.Path) -> Point | None:
    """A finished point of the plan that trained exactly as `point` would (their configs
    differ only in `mqa.workdir.RESUMABLE_CHANGES`, such as the KV cache's dtype), or None."""
    def training_part(p: Point) -> dict:
        snapshot = results.config_snapshot(p)
        for field in workdir_lib.RESUMABLE_CHANGES:
            section, _, key = field.rpartition(".")
            get_dotted(snapshot, section).pop(key, None)
        return snapshot

    mine = training_part(point)
    return next((other for other in plan if other.name != point.name
                 and training_part(other) == mine
                 and results.finished_result(workdir / other.name, other) is not None), None)
