"""Running a sweep: every point trained (or resumed, or skipped when finished), every
configuration timed, and the tables and figures written (`run_sweep`, what `sweep.py`
does), after the tuning runs of a tuning sweep (`mqa.sweep.tuning`).

Each point is an ordinary resumable training run in WORKDIR/<point name>, trained in this
process one after another, seed 0 of every configuration first, so that an interrupted
sweep leaves complete seed pairs; running the same sweep again skips finished points
(`mqa.sweep.results.finished_result`) and resumes an interrupted one. A point whose
config differs from a finished point's only in `mqa.workdir.RESUMABLE_CHANGES` (how the model
is scored, not trained) copies that run and is only evaluated. A tuning sweep first trains
its tuning runs in WORKDIR/tuning/ the same way (seed-major, finished ones skipped), then
the reporting points at each configuration's chosen value.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any, Iterable

import ml_collections

from mqa import trainer
from mqa import workdir as workdir_lib
from mqa.attention import cpu_decode
from mqa.config import build_model_config, ConfigError, get_dotted
from mqa.sweep import plots, record as record_lib, results
from mqa.sweep import tuning as tuning_lib
from mqa.sweep.points import (Point, baseline_configuration, compared_pairs, configurations,
                              declared_contrasts, only_configurations, parse_sweep_flags, points,
                              sweep_fields, with_seeds)
from mqa.sweep.speeds import measured_speeds


def run_sweep(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
              sweep: Iterable[str] = (), seeds: int | None = None,
              baseline: Iterable[str] = (), compare: Iterable[str] = (),
              tune: str | None = None, tune_seeds: int | None = None,
              decode_context: int | None = None, decode_batch: int = 8,
              decode_kernel: bool = False, only: Iterable[str] = ()) -> str:
    """Trains and times every point of a sweep, writes its tables and figures in `workdir`;
    returns the markdown tables (as results.md holds them, after its lines about the
    statistics).

    config: a training config with a `sweep` field (`mqa.sweep.points`), or any training
    config together with `sweep`: "FIELD=V1,V2,..." strings that replace that field (its
    contrasts and tuning with it), each value read like a `--config.FIELD=` override.
    seeds: train every configuration with train.seed = 0..seeds-1 (None: the seeds the
    sweep lists, if any). baseline: "FIELD=VALUE" strings naming the configuration the
    others are compared with (default: the first). compare: "CONFIGURATION:AGAINST" pairs
    added to the contrasts the config declares (`sweep.contrasts`): their seed-paired
    differences go to comparisons.csv, and they are one family with the comparisons
    against the baseline for Holm's correction (`mqa.sweep.family`). tune:
    "FIELD=V1,V2,..." to choose per configuration, on tuning seeds and the held-out
    split's tuning half, reporting on its test half (replaces the config's `sweep.tune`);
    tune_seeds: how many tuning seeds (`mqa.sweep.tuning`). decode_context, decode_batch:
    the KV-cache length and the sequences of the decoding timing (the context: None is the
    trained context, train.seq_len, so that quality and cost are measured at one length;
    capped at model.max_seq_len - 32). decode_kernel: also time decoding through the C++
    kernel (`model.decode_impl=cpu_kernel`; a decode_kernel_tokens_per_sec column).
    only: configuration names (`points.only_configurations`): tune, train and report only
    those, in that order, with the contrasts among them (the others' runs and records are
    left as they are; the full sweep's tables come back with the full command).

    Every option and every point is checked before anything trains: a bad one is a
    one-line `ConfigError`. Training errors are the trainer's (`trainer.NonFiniteLoss`,
    `trainer.Preempted`, `DataError`, ...); in a tuning run a NonFiniteLoss only marks
    its value diverged.
    """
    if decode_context is None:
        decode_context = int(config.train.seq_len)
    for name, value in (("decode_context", decode_context), ("decode_batch", decode_batch)):
        if value < 1:
            raise ConfigError(f"--{name}={value} must be >= 1")
    if decode_kernel and not cpu_decode.compiler_found():  # before anything trains
        raise ConfigError("--decode_kernel builds the C++ decoding kernel, and no C++ compiler "
                          "($CXX, default g++) was found; install g++ or leave the flag out")
    sweep = list(sweep)
    fields = parse_sweep_flags(sweep, config) if sweep else sweep_fields(config)
    if seeds is not None:
        fields = with_seeds(fields, seeds)
    plan = points(config, fields)  # every point validated before anything trains
    declared = [] if sweep else compared_pairs(plan, declared_contrasts(config), "sweep.contrasts")
    asked = compared_pairs(plan, compare)
    full_plan, only = plan, list(only)
    if only:
        plan = only_configurations(plan, only)
        kept = set(configurations(plan))
        declared, asked = ([pair for pair in pairs if set(pair) <= kept] for pairs in (declared, asked))
    baseline = baseline_configuration(plan, baseline, config)
    tuning = tuning_lib.tuning_options(config, tune, tune_seeds, declared=not sweep)
    twins = full_plan  # where a point's training twin may be (`training_twin`): any configuration's
    if tuning is not None:
        tuning_lib.check_tuning(tuning, fields, full_plan)
        every_run = tuning_lib.tuning_runs(full_plan, tuning)  # every value validated too
        rank = {name: i for i, name in enumerate(configurations(plan))}
        runs = sorted((run for run in every_run if run.configuration in rank),
                      key=lambda run: rank[run.configuration])  # in --only's order
        twins = [tuning_lib.reporting_point(point, tuning, value)
                 for point in full_plan for value in tuning.values]
    record = record_lib.record_dir(config)
    workdir = workdir_lib.prepare_workdir(workdir)
    chosen: dict[str, Any] = {}
    if tuning is not None:
        chosen = tune_configurations(runs, tuning, workdir,
                                     [run.point for run in every_run],
                                     record and record / tuning_lib.TUNING_DIR)
        plan = [tuning_lib.reporting_point(point, tuning, chosen[point.configuration])
                for point in plan]
    order = training_order(plan)
    print(f"sweep: {len(plan)} points in {workdir}: {', '.join(p.name for p in order)}", flush=True)
    finished = {point.name: train_point(point, twins, workdir, f"[{index}/{len(plan)}] {point.name}",
                                        halves=tuning is not None, record=record)
                for index, point in enumerate(order, 1)}
    speeds = measured_speeds(plan, workdir, decode_context, decode_batch, decode_kernel)
    seed_rows, curves = [], {}
    for point in plan:
        point_dir = workdir / point.name
        model_config = build_model_config(workdir_lib.saved_config(point_dir).model)
        result = finished[point.name]
        seed_rows.append(results.seed_row(
            point, result if tuning is None else result[tuning_lib.HALVES]["test"], model_config,
            speeds[point.configuration],
            None if tuning is None else {tuning.column: chosen[point.configuration]}))
        curves.setdefault(point.configuration, []).append(
            results.loss_curves(results.read_metrics(point_dir)))
    rows = results.configuration_rows(seed_rows, baseline, [*declared, *asked])
    note = "" if tuning is None else (
        f"{tuning.field} chosen per configuration on tuning seeds and the tuning half of the "
        "held-out windows (tuning.csv); every held-out metric here is the test half's. ")
    table = results.write_tables(workdir, fields, seed_rows, rows, baseline, declared, asked,
                                 [tuning.column] if tuning else (), note)
    plots.write_figures(workdir, fields, rows, curves, baseline, decode_batch)
    return table


def tune_configurations(runs: list[tuning_lib.TuningRun], tuning: tuning_lib.Tuning,
                        workdir: pathlib.Path, twins: list[Point],
                        record: pathlib.Path | None = None) -> dict[str, Any]:
    """Trains (or skips, when finished or recorded in `record`) every tuning run in
    WORKDIR/tuning/, seed-major, writes tuning.csv and tuning.png, and returns
    {configuration: chosen value}. twins: the tuning runs (of the whole sweep, not only
    `runs`) a run's training twin may be among."""
    tuning_dir = workdir_lib.prepare_workdir(workdir / tuning_lib.TUNING_DIR)
    others = [run.point for run in runs]
    order = [next(run for run in runs if run.point is point) for point in training_order(others)]
    print(f"tuning {tuning.field} over {', '.join(map(str, tuning.values))} with seeds "
          f"{', '.join(map(str, tuning.seeds))}: {len(runs)} runs in {tuning_dir}", flush=True)
    finished = {}
    for index, run in enumerate(order, 1):
        point, label = run.point, f"[tuning {index}/{len(order)}] {run.point.name}"
        point_dir = tuning_dir / point.name
        if record is not None:
            record_lib.restore(record, point_dir, point)
        result = results.recorded_result(point_dir, point)
        if result is not None and (tuning_lib.HALVES in result or tuning_lib.DIVERGED in result):
            print(f"{label}: finished, skipped", flush=True)
        else:
            try:
                result = train_point(point, twins, tuning_dir, label, halves=True)
            except trainer.NonFiniteLoss as error:
                print(f"{label}: diverged, never chosen: {error}", flush=True)
                result = {**results.new_result(point, {}), tuning_lib.DIVERGED: str(error)}
                results.write_result(point_dir, result)
        if record is not None and not result.get(results.RESTORED):
            record_lib.write_record(record, point_dir, result)
        finished[point.name] = result
    rows = tuning_lib.tuning_rows(runs, finished, tuning)
    chosen = tuning_lib.chosen_values(rows, tuning)
    for choice in tuning_lib.write_tuning(workdir, rows, chosen, tuning):
        print(tuning_lib.describe_choice(choice, tuning.field), flush=True)
    return chosen


def train_point(point: Point, twins: list[Point], workdir: pathlib.Path, label: str, *,
                halves: bool = False, record: pathlib.Path | None = None) -> dict:
    """Trains (or resumes) a point unless it has finished; returns its result.json contents.
    A point whose training twin (among `twins`) has finished copies the twin's run and is
    only evaluated.
    label: how the progress lines name the point, e.g. "[3/10] MQA__seed=0". halves: also
    score the held-out split's tuning and test halves once (`mqa.sweep.tuning.score_halves`),
    kept in result.json. record: the sweep's record folder (`mqa.sweep.record`): a point
    recorded there is finished, and a point that finishes is recorded."""
    point_dir = workdir / point.name
    needs = (tuning_lib.HALVES,) if halves else ()
    if record is not None and record_lib.restore(record, point_dir, point, needs) is not None:
        print(f"{label}: recorded in {record}, skipped", flush=True)
    result = results.finished_result(point_dir, point)
    if result is not None:
        if not result.get(results.RESTORED):
            print(f"{label}: finished (step {result['step']}), skipped", flush=True)
        if halves and tuning_lib.HALVES not in result:
            result[tuning_lib.HALVES] = tuning_lib.score_halves(point_dir, point.config)
            results.write_result(point_dir, result)
        if record is not None and not result.get(results.RESTORED):
            record_lib.write_record(record, point_dir, result)
        return result
    twin = None if (point_dir / "checkpoints").exists() else training_twin(point, twins, workdir)
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
    if halves:
        result[tuning_lib.HALVES] = tuning_lib.score_halves(point_dir, point.config)
    results.write_result(point_dir, result)
    if record is not None:
        record_lib.write_record(record, point_dir, result)
    return result


def training_part(point: Point) -> dict:
    """The point's config without the fields that do not change its training
    (`mqa.workdir.RESUMABLE_CHANGES`, such as the KV cache's dtype)."""
    snapshot = results.config_snapshot(point)
    for field in workdir_lib.RESUMABLE_CHANGES:
        section, _, key = field.rpartition(".")
        get_dotted(snapshot, section).pop(key, None)
    return snapshot


def training_order(plan: list[Point]) -> list[Point]:
    """Seed-major (every configuration's seed 0, then seed 1, ...), each point that trains
    exactly as an earlier one (its training twin) right after it, so that the twin's run is
    copied while it is still on this machine (a sweep continued elsewhere from its record
    has no checkpoint to copy)."""
    parts = [training_part(point) for point in plan]
    first = [parts.index(part) for part in parts]  # the plan index of each point's first twin
    return [plan[i] for i in sorted(range(len(plan)), key=lambda i: (plan[i].seed, first[i], i))]


def training_twin(point: Point, twins: list[Point], workdir: pathlib.Path) -> Point | None:
    """A finished point among `twins` that trained exactly as `point` would (their configs
    differ only in `mqa.workdir.RESUMABLE_CHANGES`, such as the KV cache's dtype), or None."""
    mine = training_part(point)
    return next((other for other in twins if other.name != point.name
                 and (workdir / other.name / "checkpoints").exists()  # not only recorded
                 and training_part(other) == mine
                 and results.finished_result(workdir / other.name, other) is not None), None)
