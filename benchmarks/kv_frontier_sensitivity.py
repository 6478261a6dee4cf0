"""The KV-budget frontier's declared comparisons under a second tuning seed: a sensitivity
analysis of configs/sweep_kv_frontier.py's learning-rate choice, from its records alone.

  python benchmarks/kv_frontier_sensitivity.py    # -> benchmarks/results/kv_frontier_sensitivity/

Each arm takes the rate its tuning seeds' mean tuning-half loss chooses (`mqa.sweep.tuning`)
once every rate has finished on every tuning seed in `--tune_seeds`, else the rate the
first seed chose ("pending" in the table). Every declared test (each arm against the baseline, and the
config's contrasts) is the seed-paired test-half difference over the reporting seeds, and
the family is Holm-corrected together, as the sweep does; a test whose runs at the chosen
rates are not all recorded yet counts in the family with p = 1 (so the family keeps its
size) and shows no difference. Beside each, the primary analysis's (one tuning seed) from
the same records, and a plan for what would resolve it: seeds_for_0.01, the reporting seeds
at which a true difference of PLANNED nats (about the size of those between arms here)
would be resolved with 80% power, at this test's seed-paired sd and level 0.05 / m for the
m tests of the family (what Holm's correction asks of the smallest p; exact, from the
noncentral t: `mqa.statistics.seeds_for_power`). Writes comparisons.csv and comparisons.md
to --out and prints the table; and rates.csv and rates.md, each arm's rate by its first
tuning seed and by all of them, and where the two differ and both rates' reporting runs are
recorded, what the move did to its test-half loss (seed-paired: two-seed rate minus first).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mqa import statistics  # noqa: E402
from mqa.config import ConfigError, load_config_file  # noqa: E402
from mqa.sweep import family, results, tuning as tuning_lib  # noqa: E402
from mqa.sweep.points import (Point, compared_pairs, configurations, declared_contrasts,  # noqa: E402
                              points, sweep_fields)

# pending: this test's two-seed analysis is not complete (an arm's tuning seeds or its
# reporting runs at the chosen rate are not all recorded yet)
COLUMNS = ["configuration", "against", "rate", "against_rate", "pending", "n", "diff", "ci95", "p",
           "p_holm", "resolved", "primary_diff", "primary_p_holm", "primary_resolved", "seeds_for_0.01"]
RATE_COLUMNS = ["configuration", "first_seed_rate", "two_seed_rate", "pending", "n", "change",
                "change_ci95", "change_p"]
PLANNED = 0.01  # nats: the true difference seeds_for_0.01 plans for
POWER = 0.8


def load_records(folder: pathlib.Path) -> dict[str, dict]:
    """{point name: its recorded result} for every record in folder (not its subfolders)."""
    return {path.stem: json.loads(path.read_text())["result"] for path in sorted(folder.glob("*.json"))}


def chosen_rates(runs: list[tuning_lib.TuningRun], tuning_records: dict[str, dict],
                 tuning: tuning_lib.Tuning) -> tuple[dict, dict, set[str]]:
    """(each configuration's value by all tuning seeds where every run of it is recorded,
    else by the first seed; each one's value by the first seed; those not complete)."""
    recorded = [run for run in runs if run.point.name in tuning_records]
    rows = tuning_lib.tuning_rows(recorded, tuning_records, tuning)
    first = tuning_lib.chosen_values([r for r in rows if r["seed"] == tuning.seeds[0]], tuning)
    pending = {run.configuration for run in runs if run.point.name not in tuning_records}
    both = tuning_lib.chosen_values([r for r in rows if r["configuration"] not in pending], tuning)
    return {**first, **both}, first, pending


def reporting_losses(records: dict[str, dict], plan: list[Point], tuning: tuning_lib.Tuning,
                     configuration: str, value) -> dict[int, float] | None:
    """{seed: test-half loss} of the configuration's reporting runs at value, or None
    unless all of them are recorded."""
    found = {}
    for point in (p for p in plan if p.configuration == configuration):
        result = records.get(tuning_lib.reporting_point(point, tuning, value).name)
        if result is None:
            return None
        found[point.seed] = result[tuning_lib.HALVES]["test"]["eval_loss"]
    return found


def compare(records, plan, tuning, pairs, values) -> list[dict]:
    """Each pair's seed-paired test-half difference at the given values, and the family's
    Holm-adjusted p-values (a pair not all recorded: p = 1, no difference)."""
    rows = []
    for arm, against in pairs:
        mine, theirs = (reporting_losses(records, plan, tuning, name, values[name]) for name in (arm, against))
        paired = statistics.paired_difference(mine, theirs) if mine and theirs else None
        rows.append({"configuration": arm, "against": against, "rate": values[arm], "against_rate": values[against],
                     "n": paired and paired["n"], "diff": paired and paired["mean"],
                     "ci95": paired and paired["ci95"], "p": paired["p"] if paired else 1.0,
                     "seeds_for_0.01": paired and statistics.seeds_for_power(
                         PLANNED, paired["sd"], statistics.ALPHA / len(pairs), POWER)})
    for row, adjusted in zip(rows, statistics.holm([row["p"] for row in rows])):
        row["p_holm"], row["resolved"] = adjusted, row["diff"] is not None and adjusted < statistics.ALPHA
    return rows


def rate_rows(records, plan, tuning, values, first, pending) -> list[dict]:
    """A row per configuration: its rate by the first tuning seed and by all, and where they
    differ, the seed-paired test-half difference between its reporting runs at the two."""
    rows = []
    for name in configurations(plan):
        new, old = (reporting_losses(records, plan, tuning, name, v) for v in (values[name], first[name]))
        paired = statistics.paired_difference(new, old) if values[name] != first[name] and new and old else None
        rows.append({"configuration": name, "first_seed_rate": first[name], "two_seed_rate": values[name],
                     "pending": name in pending, "n": paired and paired["n"],
                     "change": paired and paired["mean"], "change_ci95": paired and paired["ci95"],
                     "change_p": paired and paired["p"]})
    return rows


def markdown(rows: list[dict], columns: list[str]) -> str:
    """The table, differences to 4 decimals, p-values to 3 significant figures."""
    def cell(value, kind):
        if value is None:
            return ""
        if isinstance(value, bool):
            return "yes" if value else "no"
        return format(value, {"diff": "+.4f", "ci95": ".4f", "p": ".3g"}[kind]) if kind else str(value)
    kinds = {"diff": "diff", "primary_diff": "diff", "change": "diff", "ci95": "ci95", "change_ci95": "ci95",
             "p": "p", "p_holm": "p", "primary_p_holm": "p", "change_p": "p"}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c), kinds.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "sweep_kv_frontier.py"))
    parser.add_argument("--tune_seeds", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks" / "results" / "kv_frontier_sensitivity")
    args = parser.parse_args(argv)
    try:
        config = load_config_file(args.config, validate_config=False)
        tuning = tuning_lib.tuning_options(config, tune_seeds=args.tune_seeds)
        plan = points(config, sweep_fields(config))
        pairs = family.comparison_family(configurations(plan), plan[0].configuration,
                                         compared_pairs(plan, declared_contrasts(config), "sweep.contrasts"))
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    folder = pathlib.Path(config.sweep.record)
    records, tuning_records = load_records(folder), load_records(folder / tuning_lib.TUNING_DIR)
    values, first, pending = chosen_rates(tuning_lib.tuning_runs(plan, tuning), tuning_records, tuning)
    rows = compare(records, plan, tuning, pairs, values)
    for row, primary in zip(rows, compare(records, plan, tuning, pairs, first)):
        row["pending"] = row["diff"] is None or bool({row["configuration"], row["against"]} & pending)
        row.update(primary_diff=primary["diff"], primary_p_holm=primary["p_holm"],
                   primary_resolved=primary["resolved"])
    args.out.mkdir(parents=True, exist_ok=True)
    results.write_csv(rows, COLUMNS, args.out / "comparisons.csv")
    table = markdown(rows, COLUMNS)
    (args.out / "comparisons.md").write_text(table + "\n")
    print(table)
    rates = rate_rows(records, plan, tuning, values, first, pending)
    results.write_csv(rates, RATE_COLUMNS, args.out / "rates.csv")
    (args.out / "rates.md").write_text(markdown(rates, RATE_COLUMNS) + "\n")
    return rows


if __name__ == "__main__":
    main()
