"""Per-configuration tuning inside a sweep: one field (the learning rate is the use) chosen
for each configuration on runs that are never reported, by a half of the held-out split
that the reported numbers do not use.

  python sweep.py --config=configs/sweep_kv_heads.py --workdir=runs/kv_lr \
      --tune=train.learning_rate=1e-3,2e-3,4e-3 --tune_seeds=2
  # or in the sweep config: config.sweep.tune = {"train.learning_rate": [1e-3, 2e-3, 4e-3]}
  #                         config.sweep.tune_seeds = 2

For each configuration, every value is trained with the *tuning seeds*, train.seed =
1000, 1001, ... (`TUNING_SEED_BASE`; one unless `tune_seeds` says more), which are never
reporting seeds (a sweep whose reporting seeds reach 1000 is refused), in
WORKDIR/tuning/<configuration>__<field>=<value>__seed=<seed>, and scored on the *tuning
half* of the held-out windows its final evaluation scores (`mqa.evaluation.part_windows`:
the first half of the windows). The value with the lowest mean tuning-half loss over the
tuning seeds is chosen (`chosen_values`; the first listed on a tie). A tuning run whose
loss stops being finite (`trainer.NonFiniteLoss`: a learning rate too high) is recorded as
diverged and never chosen. Then the configuration's reporting seeds train at the chosen
value, in WORKDIR/<configuration>__<field>=<value>__seed=<seed> (a new folder if the
choice ever changes), and everything reported for them is scored on the *test half*.

Why both: a value chosen on the very runs and text it is reported on would be chosen
partly for their luck, and the reported loss would be biased low by the choice. Other
seeds keep the reported runs' batches and initialisations out of the choice, and the other
half of the held-out text keeps the chosen value's fit to the tuning text out of the
reported loss.

Every tuning run's tuning-half loss goes to WORKDIR/tuning.csv (`tuning_rows`), drawn in
tuning.png (`mqa.sweep.plots.plot_tuning`); the chosen value is a column of results.csv
named after the field (`column`). A tuning run counts as finished when its result.json
records its config and its halves' losses (or its divergence), checkpoint or not, so its
result files alone let a sweep continue.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import ml_collections
import numpy as np

from mqa import statistics, train_schedule, trainer
from mqa.config import ConfigError, get_dotted, set_dotted, validate
from mqa.evaluation import HELD_OUT_PARTS, evaluation_text, held_out_loss, model_batch_nll
from mqa.loading import load_model
from mqa.sweep import plots, results
from mqa.sweep.points import (POINTS_FIELD, SEED_FIELD, Point, configurations, field_lists,
                              parse_sweep_flags, point_name, sweep_option, training_config)

TUNE = "tune"               # sweep.tune: {"section.field": [values]}
TUNE_SEEDS = "tune_seeds"   # sweep.tune_seeds: how many tuning seeds (default 1)
TUNING_SEED_BASE = 1000     # tuning seeds are 1000, 1001, ...
TUNING_DIR = "tuning"       # WORKDIR/tuning/<tuning run>/
TUNING_FILE = "tuning.csv"
CHOICES_FILE = "tuning_choices.csv"
HALVES = "halves"           # result.json: {"tuning": {eval_*}, "test": {eval_*}}
DIVERGED = "diverged"       # result.json of a tuning run that diverged: the error's line


@dataclasses.dataclass(frozen=True)
class Tuning:
    """What a sweep tunes: a field, its candidate values, and the tuning seeds."""

    field: str
    values: tuple
    seeds: tuple[int, ...]

    @property
    def column(self) -> str:
        """The results' column of the chosen value: the field's last part, or the whole
        dotted name where the tables already have a column of that name (`mlp_dim`)."""
        short = self.field.rpartition(".")[2]
        taken = {"point", "configuration", *results.SEED_COLUMNS, *results.CONFIGURATION_COLUMNS}
        return self.field if short in taken else short


@dataclasses.dataclass(frozen=True)
class TuningRun:
    """One tuning run: a configuration trained at values[index] with a tuning seed."""

    configuration: str
    index: int
    point: Point


def tuning_options(config: ml_collections.ConfigDict, tune: str | None = None,
                   tune_seeds: int | None = None, *, declared: bool = True) -> Tuning | None:
    """The sweep's tuning: --tune's "FIELD=V1,V2,..." (each value read like a --config
    override), else the config's `sweep.tune` when `declared` (not when --sweep replaced
    the config's sweep); tune_seeds: --tune_seeds, else `sweep.tune_seeds`, else 1. None
    when nothing is tuned. A one-line ConfigError for a bad option."""
    if tune:
        fields = parse_sweep_flags([tune], config, flag="--tune")
    elif declared and sweep_option(config, TUNE) is not None:
        fields = field_lists(sweep_option(config, TUNE), named_points=False, what="sweep.tune field")
    else:
        if tune_seeds is not None:
            raise ConfigError(f"--tune_seeds={tune_seeds} needs a field to tune: "
                              "--tune=FIELD=V1,V2,... or the config's sweep.tune")
        return None
    where = f"--tune={tune}" if tune else f"sweep.tune={dict(fields)}"
    if len(fields) != 1:
        raise ConfigError(f"{where} must name one field to tune, e.g. "
                          f"train.learning_rate=1e-3,2e-3,4e-3; got {len(fields)}")
    [(field, values)] = fields.items()
    get_dotted(training_config(config), field)  # an unknown field: a ConfigError naming it
    if field == SEED_FIELD:
        raise ConfigError(f"{where}: train.seed cannot be tuned (tuning seeds are "
                          f"{TUNING_SEED_BASE}, {TUNING_SEED_BASE + 1}, ...)")
    if len(values) < 2 or len(set(map(repr, values))) < len(values):
        raise ConfigError(f"{where} must list at least two different values to choose from, "
                          f"got {values}")
    count = tune_seeds if tune_seeds is not None else (
        sweep_option(config, TUNE_SEEDS, 1) if declared else 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        named = "--tune_seeds" if tune_seeds is not None else "sweep.tune_seeds"
        raise ConfigError(f"{named}={count!r} must be an integer >= 1 (tuning seeds per "
                          "configuration and value)")
    return Tuning(field, tuple(values), tuple(range(TUNING_SEED_BASE, TUNING_SEED_BASE + count)))


def check_tuning(tuning: Tuning, fields: dict[str, list], plan: list[Point]) -> None:
    """A ConfigError when the tuned field is also swept or set by a named point, or when a
    reporting seed is in the tuning seeds' range (>= TUNING_SEED_BASE)."""
    if tuning.field in fields:
        raise ConfigError(f"--tune field {tuning.field} is also swept; sweep it or tune it, "
                          "not both")
    for values in fields.get(POINTS_FIELD, []):
        if tuning.field in values:
            raise ConfigError(f"--tune field {tuning.field} is set by the sweep point "
                              f"{values['name']!r}; tune another field or drop it there")
    clash = sorted({point.seed for point in plan if point.seed >= TUNING_SEED_BASE})
    if clash:
        raise ConfigError(f"reporting seeds {clash} are in the tuning seeds' range (train.seed "
                          f">= {TUNING_SEED_BASE}); report with seeds below {TUNING_SEED_BASE}")


def _with_value(point: Point, tuning: Tuning, value: Any, seed: int) -> ml_collections.ConfigDict:
    """The point's config with the tuned field at `value` and train.seed at `seed`, validated."""
    config = ml_collections.ConfigDict(point.config.to_dict())
    try:
        set_dotted(config, tuning.field, value)
        set_dotted(config, SEED_FIELD, seed)
        validate(config)
    except ConfigError as error:
        raise ConfigError(f"tuning {point.configuration} at {tuning.field}={value!r}: "
                          f"{error}") from None
    return config


def _named(point: Point, tuning: Tuning, value: Any, seed: int) -> dict[str, Any]:
    """The point's values without its seed, then the tuned field's, then the seed."""
    rest = {name: v for name, v in point.values.items() if name != SEED_FIELD}
    return {**rest, tuning.field: value, SEED_FIELD: seed}


def tuning_runs(plan: list[Point], tuning: Tuning) -> list[TuningRun]:
    """Every configuration of the plan (its first point standing for it) at every value
    with every tuning seed, each config validated: a ConfigError names a value a
    configuration cannot take."""
    first = {}
    for point in plan:
        first.setdefault(point.configuration, point)
    runs = []
    for name in configurations(plan):
        for seed in tuning.seeds:
            for index, value in enumerate(tuning.values):
                values = _named(first[name], tuning, value, seed)
                config = _with_value(first[name], tuning, value, seed)
                runs.append(TuningRun(name, index, Point(point_name(values), values, config)))
    return runs


def reporting_point(point: Point, tuning: Tuning, value: Any) -> Point:
    """The point trained at the tuned field's chosen `value`: its folder is named with the
    value (`MHA__learning_rate=0.002__seed=0`), its configuration stays the point's."""
    config = _with_value(point, tuning, value, point.seed)
    return Point(point_name(_named(point, tuning, value, point.seed)), point.values, config)


def score_halves(point_dir: pathlib.Path, config: ml_collections.ConfigDict) -> dict[str, dict]:
    """{"tuning": {...}, "test": {...}}: the trained model in `point_dir` scored on each half
    of the held-out windows its run's final evaluation scores (`train_schedule.final_eval_windows`
    of `config`, in batches of train.batch_size, as the trainer scores them), each with
    "eval_loss", "eval_perplexity", "eval_bits_per_byte" and "eval_tokens"."""
    model = load_model(point_dir)
    seq_len = config.train.seq_len
    text = evaluation_text(model, None, seq_len)
    batch_nll = model_batch_nll(model)
    halves = {}
    for part in HELD_OUT_PARTS:
        scored = held_out_loss(batch_nll, text.tokens, seq_len=seq_len,
                               batch_size=config.train.batch_size,
                               max_windows=train_schedule.final_eval_windows(config),
                               bytes_per_token=text.bytes_per_token, part=part)
        halves[part] = {f"eval_{key}": value for key, value in scored.items()}
    return halves


def tuning_rows(runs: list[TuningRun], results: dict[str, dict], tuning: Tuning) -> list[dict]:
    """A row of tuning.csv per tuning run, in plan order: "configuration", the field's
    column, "seed", "point", its tuning half's "eval_loss", "eval_bits_per_byte" and
    "eval_tokens" (empty when it "diverged", which holds the error). results: each run's
    result.json contents by point name."""
    order = {name: i for i, name in enumerate(dict.fromkeys(r.configuration for r in runs))}
    rows = []
    for run in sorted(runs, key=lambda r: (order[r.configuration], r.index, r.point.seed)):
        result = results[run.point.name]
        half = (result.get(HALVES) or {}).get("tuning", {})
        rows.append({"configuration": run.configuration, tuning.column: tuning.values[run.index],
                     "seed": run.point.seed, "point": run.point.name,
                     "eval_loss": half.get("eval_loss"),
                     "eval_bits_per_byte": half.get("eval_bits_per_byte"),
                     "eval_tokens": half.get("eval_tokens"), DIVERGED: result.get(DIVERGED)})
    return rows


def losses_by_value(rows: list[dict], tuning: Tuning) -> dict[str, dict[int, dict[int, float]]]:
    """{configuration: {value index: {seed: tuning-half loss}}}; a diverged (or
    non-finite) run's loss is infinite."""
    losses: dict[str, dict[int, dict[int, float]]] = {}
    index = {repr(v): i for i, v in enumerate(tuning.values)}
    for row in rows:
        loss = row["eval_loss"]
        finite = loss is not None and not row.get(DIVERGED) and math.isfinite(loss)
        losses.setdefault(row["configuration"], {}).setdefault(
            index[repr(row[tuning.column])], {})[row["seed"]] = loss if finite else math.inf
    return losses


def mean_losses(rows: list[dict], tuning: Tuning) -> dict[str, list[float]]:
    """{configuration: [mean tuning-half loss over the tuning seeds, per value]}; a value
    with a diverged (or non-finite) run counts as infinite."""
    return {name: [float(np.mean(list(by_value.get(index, {0: math.inf}).values())))
                   for index in range(len(tuning.values))]
            for name, by_value in losses_by_value(rows, tuning).items()}


def chosen_values(rows: list[dict], tuning: Tuning) -> dict[str, Any]:
    """{configuration: the value with the lowest mean tuning-half loss} (the first listed
    of equal ones); a ConfigError when every value of a configuration diverged."""
    chosen = {}
    for name, means in mean_losses(rows, tuning).items():
        best = min(range(len(means)), key=lambda index: (means[index], index))
        if not math.isfinite(means[best]):
            raise ConfigError(f"every --tune value of {tuning.field} diverged for {name} "
                              f"({', '.join(map(str, tuning.values))}); try smaller ones")
        chosen[name] = tuning.values[best]
    return chosen


def choice_rows(rows: list[dict], tuning: Tuning, chosen: dict[str, Any]) -> list[dict]:
    """How firmly each configuration's value was chosen, a row each (tuning_choices.csv):
    "chosen"; "runner_up", the value with the next-lowest mean tuning-half loss (empty when
    no other value finished); "margin", its mean loss minus the chosen value's (>= 0), and
    over the tuning seeds both finished, "margin_ci95" (the seed-paired t interval's
    half-width) and "margin_p" (the paired t-test's p; both empty with one seed): a
    margin whose interval holds zero is a choice the tuning seeds do not resolve;
    "seed_choices", each tuning seed's own best value ("seed:value", the first listed on
    a tie), and "seeds_agree", whether every seed's own best is the chosen value."""
    means = mean_losses(rows, tuning)
    finite = {name: {i: {seed: loss for seed, loss in by_seed.items() if math.isfinite(loss)}
                     for i, by_seed in by_value.items()}
              for name, by_value in losses_by_value(rows, tuning).items()}
    found = []
    for name, value in chosen.items():
        best = [repr(v) for v in tuning.values].index(repr(value))
        others = [i for i in range(len(tuning.values)) if i != best and math.isfinite(means[name][i])]
        row = {"configuration": name, "chosen": value, "runner_up": None, "margin": None,
               "margin_ci95": None, "margin_p": None}
        if others:
            second = min(others, key=lambda i: (means[name][i], i))
            paired = statistics.paired_difference(finite[name][second], finite[name][best])
            row.update(runner_up=tuning.values[second], margin=means[name][second] - means[name][best],
                       margin_ci95=paired["ci95"], margin_p=paired["p"])
        own = {}
        for seed in tuning.seeds:
            scored = [(finite[name][i][seed], i) for i in finite[name] if seed in finite[name][i]]
            if scored:
                own[seed] = tuning.values[min(scored)[1]]
        row["seed_choices"] = " ".join(f"{seed}:{v}" for seed, v in own.items())
        row["seeds_agree"] = all(repr(v) == repr(value) for v in own.values())
        found.append(row)
    return found


def describe_choice(row: dict, field: str) -> str:
    """One line for the sweep's output: the choice, its runner-up and margin, and the
    tuning seeds' own choices when there are several."""
    line = f"tuning: {row['configuration']} takes {field}={row['chosen']}"
    if row["runner_up"] is not None:
        line += f" (runner-up {row['runner_up']} by {row['margin']:.4f} nats"
        if row["margin_ci95"] is not None:
            line += f" +- {row['margin_ci95']:.4f}, seeds {row['seed_choices']}"
        line += ")"
    return line


def write_tuning(workdir: pathlib.Path, rows: list[dict], chosen: dict[str, Any],
                 tuning: Tuning) -> list[dict]:
    """Writes WORKDIR/tuning.csv (`tuning_rows`, and "chosen": whether the row's value is
    its configuration's choice), tuning_choices.csv (`choice_rows`, which it returns) and
    tuning.png (`plots.plot_tuning`)."""
    for row in rows:
        row["chosen"] = repr(row[tuning.column]) == repr(chosen[row["configuration"]])
    columns = ["configuration", tuning.column, "seed", "point", "eval_loss",
               "eval_bits_per_byte", "eval_tokens", DIVERGED, "chosen"]
    results.write_csv(rows, columns, workdir / TUNING_FILE)
    choices = choice_rows(rows, tuning, chosen)
    results.write_csv(choices, list(choices[0]) if choices else ["configuration"], workdir / CHOICES_FILE)
    plots.plot_tuning(rows, tuning.column, chosen, workdir / "tuning.png",
                      xlabel=tuning.field, means=mean_losses(rows, tuning),
                      values=list(tuning.values))
    return choices
