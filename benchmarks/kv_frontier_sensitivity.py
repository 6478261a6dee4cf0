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
the same records. Writes comparisons.csv and comparisons.md to --out and prints the table.
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
from mqa.sweep.points import declared_contrasts, sweep_option  # noqa: E402

# pending: this test's two-seed analysis is not complete (an arm's tuning seeds or its
# reporting runs at the chosen rate are not all recorded yet)
COLUMNS = ["configuration", "against", "rate", "against_rate", "pending", "n", "diff", "ci95", "p",
           "p_holm", "resolved", "primary_diff", "primary_p_holm", "primary_resolved"]


def load_records(folder: pathlib.Path) -> dict[str, dict]:
    """{point name: its recorded result} for every record in folder (not its subfolders)."""
    return {path.stem: json.loads(path.read_text())["result"] for path in sorted(folder.glob("*.json"))}


def chosen_rates(tuning_records: dict[str, dict], arms: list[str],
                 tuning: tuning_lib.Tuning) -> tuple[dict, dict, set[str]]:
    """(each arm's rate by all tuning seeds where they have all finished, else by the first;
    each arm's rate by the first tuning seed; the arms not finished on every seed)."""
    rows = []
    for arm in arms:
        for value in tuning.values:
            for seed in tuning.seeds:
                result = tuning_records.get(f"{arm}__{tuning.column}={value}__seed={seed}")
                if result is not None:
                    loss = (result.get(tuning_lib.HALVES) or {}).get("tuning", {}).get("eval_loss")
                    rows.append({"configuration": arm, tuning.column: value, "seed": seed, "eval_loss": loss,
                                 tuning_lib.DIVERGED: result.get(tuning_lib.DIVERGED)})
    first = tuning_lib.chosen_values([r for r in rows if r["seed"] == tuning.seeds[0]], tuning)
    complete = {arm for arm in arms
                if sum(r["configuration"] == arm for r in rows) == len(tuning.values) * len(tuning.seeds)}
    both = tuning_lib.chosen_values([r for r in rows if r["configuration"] in complete], tuning)
    return {**first, **both}, first, set(arms) - complete


def test_losses(records: dict[str, dict], arm: str, column: str, rate, seeds: list[int]) -> dict[int, float] | None:
    """{seed: test-half loss} of arm's reporting runs at rate, or None unless all are recorded."""
    found = {}
    for seed in seeds:
        result = records.get(f"{arm}__{column}={rate}__seed={seed}")
        if result is None:
            return None
        found[seed] = result[tuning_lib.HALVES]["test"]["eval_loss"]
    return found


def compare(records, pairs, rates, column, seeds) -> list[dict]:
    """Each declared (arm, against) pair's seed-paired difference at the given rates, and
    the family's Holm-adjusted p-values (a pair not yet recorded: p = 1, no difference)."""
    rows = []
    for arm, against in pairs:
        mine, theirs = (test_losses(records, name, column, rates[name], seeds) for name in (arm, against))
        paired = statistics.paired_difference(mine, theirs) if mine and theirs else None
        rows.append({"configuration": arm, "against": against, "rate": rates[arm], "against_rate": rates[against],
                     "n": paired and paired["n"], "diff": paired and paired["mean"],
                     "ci95": paired and paired["ci95"], "p": paired["p"] if paired else 1.0})
    for row, adjusted in zip(rows, statistics.holm([row["p"] for row in rows])):
        row["p_holm"], row["resolved"] = adjusted, row["diff"] is not None and adjusted < statistics.ALPHA
    return rows


def markdown(rows: list[dict]) -> str:
    """The table, differences to 4 decimals, p-values to 3 significant figures."""
    def cell(value, kind):
        if value is None:
            return ""
        if isinstance(value, bool):
            return "yes" if value else "no"
        return format(value, {"diff": "+.4f", "ci95": ".4f", "p": ".3g"}[kind]) if kind else str(value)
    kinds = {"diff": "diff", "primary_diff": "diff", "ci95": "ci95", "p": "p", "p_holm": "p", "primary_p_holm": "p"}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(c), kinds.get(c)) for c in COLUMNS) + " |" for row in rows]
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
        if tuning is None:
            raise ConfigError(f"--config {args.config} tunes nothing: no sensitivity to a tuning seed")
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    arms = [point["name"] for point in config.sweep.points]
    folder = pathlib.Path(config.sweep.record)
    records, tuning_records = load_records(folder), load_records(folder / tuning_lib.TUNING_DIR)
    rates, first, pending = chosen_rates(tuning_records, arms, tuning)
    pairs = family.comparison_family(arms, arms[0], [tuple(c.split(":")) for c in declared_contrasts(config)])
    seeds = list(sweep_option(config, "train.seed"))
    rows = compare(records, pairs, rates, tuning.column, seeds)
    for row, primary in zip(rows, compare(records, pairs, first, tuning.column, seeds)):
        row["pending"] = row["diff"] is None or bool({row["configuration"], row["against"]} & pending)
        row.update(primary_diff=primary["diff"], primary_p_holm=primary["p_holm"],
                   primary_resolved=primary["resolved"])
    args.out.mkdir(parents=True, exist_ok=True)
    results.write_csv(rows, COLUMNS, args.out / "comparisons.csv")
    table = markdown(rows)
    (args.out / "comparisons.md").write_text(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
