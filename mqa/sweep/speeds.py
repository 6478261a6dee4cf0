"""A sweep's speeds: every configuration's train step and decoding, timed side by side.

Each configuration (its first point standing for all its seeds) has its train step (as
`train.py` compiles it, `TRAIN_STEPS` steps per sample) and its trained model's cached
decoding (`DECODE_STEPS` steps of `decode_batch` sequences from a cache holding
`decode_context` tokens) compiled first, then all are timed in `TIMING_ROUNDS` alternating
rounds (`mqa.timing.alternating_medians`), so that the machine's load falls on all alike.
With `kernel`, each configuration's decoding is also timed through the C++ kernel
(`model.decode_impl=cpu_kernel`, the same loop and cache) in the same rounds. The medians
are kept in WORKDIR/speeds.json, {configuration: {"train_tokens_per_sec", "config_sha256",
"decode": {"context", "batch", "steps", "tokens_per_sec", "requested_context"},
"decode_kernel": {"tokens_per_sec"} (with `kernel`)}}, and timed again, all together, when
any configuration is new or trained with another config, or the decode settings differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import sys
from typing import Callable

import tqdm
from flax import nnx

from mqa.config import build_model_config, default_config
from mqa.loading import load_model
from mqa.model import Transformer
from mqa.sweep.points import Point
from mqa.sweep.results import config_snapshot
from mqa.timing import alternating_medians, decode_loop, graphdef_for, timed, train_loop

DECODE_STEPS = 32    # cached decoding steps per timing
TRAIN_STEPS = 3      # train steps per timing
TIMING_ROUNDS = 5    # alternating rounds; the median is reported
SPEEDS_FILE = "speeds.json"


def config_digest(point: Point) -> str:
    """sha256 of the point's training config where it differs from `configs/default.py`
    (as JSON): what its speeds were measured for, without writing the config (and its local
    paths) into speeds.json. A field added to the schema at its default changes no digest,
    so it does not send a finished sweep's speeds to be timed again."""
    text = json.dumps(_changed(config_snapshot(point), default_config().to_dict()), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _changed(values: dict, defaults: dict) -> dict:
    """The entries of `values` (nested) that differ from `defaults`."""
    changed = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            inner = _changed(value, default)
            if inner:
                changed[key] = inner
        elif value != default or key not in defaults:
            changed[key] = value
    return changed


def _counted(run: Callable[[], float], bar: tqdm.tqdm) -> Callable[[], float]:
    """`run`, advancing `bar` after each call (outside the time it measures)."""
    def counted_run() -> float:
        seconds = run()
        bar.update()
        return seconds
    return counted_run


def time_speeds(representatives: dict[str, Point], workdir: pathlib.Path, context: int,
                batch: int, kernel: bool = False) -> dict[str, dict]:
    """Train-step and decoding tokens/s of each configuration (by name, each represented by
    its first point, whose trained weights decode), and with `kernel` its decoding through
    the C++ kernel, as speeds.json holds them. A progress bar on stderr counts the
    compilations and then the timed runs."""
    runs, used, tokens = {}, {}, {}
    kernels = sum(kernel and point.config.model.dtype == "float32" for point in representatives.values())
    total = (2 * len(representatives) + kernels) * (1 + TIMING_ROUNDS)
    bar = tqdm.tqdm(total=total, desc="timing", unit="run", file=sys.stderr, dynamic_ncols=True,
                    mininterval=0.5 if sys.stderr.isatty() else 30.0)
    with bar:
        for name, point in representatives.items():
            bar.set_postfix_str(f"compiling {name}")
            train_run, tokens[name] = train_loop(point.config, TRAIN_STEPS)
            train_run()  # compile
            bar.update()
            runs[("train", name)] = _counted(timed(train_run), bar)
            graphdef, params, model_config = decoding_model(point, workdir / point.name)
            limit = model_config.max_seq_len - DECODE_STEPS
            used[name] = min(context, limit)
            if used[name] < context:
                bar.write(f"{name}: decode context {context} capped to {limit} (model.max_seq_len="
                          f"{model_config.max_seq_len} minus {DECODE_STEPS} timed steps)",
                          file=sys.stdout)
            decode_run, _, _ = decode_loop(graphdef, params, model_config, batch, used[name],
                                           DECODE_STEPS)
            decode_run()  # compile
            bar.update()
            runs[("decode", name)] = _counted(timed(decode_run), bar)
            if kernel and model_config.dtype == "float32":  # the kernel computes in float32
                kernel_config = dataclasses.replace(model_config, decode_impl="cpu_kernel")
                kernel_run, _, _ = decode_loop(graphdef_for(kernel_config), params, kernel_config,
                                               batch, used[name], DECODE_STEPS)
                kernel_run()  # compile
                bar.update()
                runs[("decode_kernel", name)] = _counted(timed(kernel_run), bar)
        bar.set_postfix_str(f"{TIMING_ROUNDS} alternating rounds")
        medians = alternating_medians(runs, TIMING_ROUNDS)
    speeds = {}
    for name, point in representatives.items():
        train_rate = tokens[name] / medians[("train", name)]
        decode_rate = batch * DECODE_STEPS / medians[("decode", name)]
        through_kernel = ""
        speeds[name] = {"train_tokens_per_sec": train_rate,
                        "config_sha256": config_digest(point),
                        "decode": {"context": used[name], "batch": batch, "steps": DECODE_STEPS,
                                   "tokens_per_sec": decode_rate, "requested_context": context}}
        if kernel:  # None: not float32, which the kernel does not take
            timed_run = medians.get(("decode_kernel", name))
            kernel_rate = batch * DECODE_STEPS / timed_run if timed_run else None
            speeds[name]["decode_kernel"] = {"tokens_per_sec": kernel_rate}
            if kernel_rate:
                through_kernel = f", {kernel_rate:,.0f} through the kernel"
        print(f"{name}: training {train_rate:,.0f} tokens/s, decoding {decode_rate:,.0f} "
              f"tokens/s{through_kernel} (batch {batch}, context {used[name]})", flush=True)
    return speeds


def decoding_model(point: Point, point_dir: pathlib.Path):
    """(graphdef, params, model config) that decode as the point's model: its trained
    weights, or, for a point laid out from a record (`mqa.sweep.record`, no checkpoint),
    freshly initialised ones of the same shapes (decoding's speed does not depend on the
    values)."""
    if (point_dir / "checkpoints").exists():
        model = load_model(point_dir)
        return model.graphdef, model.params, model.model_config
    model_config = build_model_config(point.config.model)
    graphdef, params = nnx.split(Transformer(model_config, rngs=nnx.Rngs(0)))
    return graphdef, params, model_config


def measured_speeds(plan: list[Point], workdir: pathlib.Path, context: int,
                    batch: int, kernel: bool = False) -> dict[str, dict]:
    """Each configuration's speeds, by name: WORKDIR/speeds.json's when it holds every
    configuration of the plan, measured for its config and these decode settings (and
    through the kernel too, with `kernel`); otherwise all timed again side by side
    (`time_speeds`) and saved."""
    representatives = {}
    for point in plan:
        representatives.setdefault(point.configuration, point)
    path = workdir / SPEEDS_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    current = all(
        name in saved and saved[name].get("config_sha256") == config_digest(point)
        and (saved[name]["decode"]["requested_context"], saved[name]["decode"]["batch"])
        == (context, batch) and (not kernel or "decode_kernel" in saved[name])
        for name, point in representatives.items())
    if current:
        return saved
    speeds = time_speeds(representatives, workdir, context, batch, kernel)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(speeds, indent=2) + "\n")
    tmp.replace(path)
    return speeds
