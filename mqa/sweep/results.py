"""A sweep's results: each point's result.json, its metrics, and the tables of all points.

`POINT_DIR/result.json` is written when a point's training has finished:

  {"name", "values", "config"  (the point's training config, as trained),
   "step", "eval_loss", "eval_perplexity", "eval_bits_per_byte", "eval_tokens"
   (the final evaluation, over the whole held-out split),
   "halves" (in a tuning sweep: {"tuning": {...}, "test": {...}}, the same four metrics on
   each half of those windows, `mqa.sweep.tuning.score_halves`)}

Speeds are measured per configuration, side by side, and kept in `WORKDIR/speeds.json`
(`mqa.sweep.speeds`). Two tables: `results_by_seed.csv` has a row per point (`seed_row`,
`SEED_COLUMNS`); `results.csv` / `results.md` a row per configuration
(`configuration_rows`), with each held-out metric's mean, sample sd and 95% interval over
seeds, and its seed-paired difference against the baseline configuration with that
difference's interval, its paired t-test's p-value, that p Holm-adjusted over the sweep's
family of comparisons and whether the adjusted p resolves it (`mqa.sweep.family`);
`comparisons.csv` the contrasts declared in the config and asked for with --compare
(`comparison_rows`), with the same. `write_tables` writes them all. In a tuning sweep the
metrics are the test half's (`mqa.sweep.tuning`) and the tuned field's chosen value is a
column after the swept ones.
"""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Any, Iterable

from mqa import accounting
from mqa import statistics as stats
from mqa.config import ModelConfig, with_defaults
from mqa.sweep import family
from mqa.sweep.points import POINTS_FIELD, SEED_FIELD, Point

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
RESTORED = "restored_from_record"  # result.json key of a point laid out from its record (`mqa.sweep.record`)
SUMMARIZED = ("eval_loss", "eval_bits_per_byte")  # held-out metrics summarised over seeds
EVAL_KEYS = ("eval_loss", "eval_perplexity", "eval_bits_per_byte", "eval_tokens")
P_STYLE = "{:.2g}"
# Columns after the swept fields, with their markdown formats.
MODEL_COLUMNS = {"attention": "{}", "num_kv_heads": "{:d}", "mlp_dim": "{:d}", "params": "{:,d}",
                 "kv_cache_bytes_per_token": "{:,.0f}"}
SPEED_COLUMNS = {"train_tokens_per_sec": "{:,.0f}", "decode_context": "{:d}",
                 "decode_tokens_per_sec": "{:,.0f}"}
SEED_COLUMNS = {"seed": "{:d}", **MODEL_COLUMNS, "eval_loss": "{:.4f}",
                "eval_perplexity": "{:.3f}", "eval_bits_per_byte": "{:.4f}",
                "eval_tokens": "{:,d}", **SPEED_COLUMNS}
CONFIGURATION_COLUMNS = {
    **MODEL_COLUMNS, "n": "{:d}",
    **{f"{metric}{suffix}": style for metric in SUMMARIZED for suffix, style in (
        ("_mean", "{:.4f}"), ("_sd", "{:.4f}"), ("_ci95", "{:.4f}"), ("_diff", "{:+.4f}"),
        ("_diff_ci95", "{:.4f}"), ("_diff_p", P_STYLE), ("_diff_p_holm", P_STYLE),
        ("_diff_resolved", "{}"))},
    **SPEED_COLUMNS,
}
# comparisons.csv: a configuration against another, seed-paired (`comparison_rows`)
COMPARISON_COLUMNS = {"configuration": "{}", "against": "{}", "declared": "{}", "n": "{:d}",
                      "eval_loss_diff": "{:+.4f}", "eval_loss_diff_ci95": "{:.4f}",
                      "eval_loss_diff_p": P_STYLE, "eval_loss_diff_p_holm": P_STYLE,
                      "eval_loss_diff_resolved": "{}", "kv_cache_ratio": "{:.3f}",
                      "decode_speed_ratio": "{:.2f}"}
# With --decode_kernel (`mqa.sweep.speeds`): decoding through the C++ kernel, after the others.
KERNEL_COLUMNS = {"decode_kernel_tokens_per_sec": "{:,.0f}"}
KERNEL_COMPARISON_COLUMNS = {"decode_kernel_speed_ratio": "{:.2f}"}
METRIC_COLUMNS = {**SEED_COLUMNS, **CONFIGURATION_COLUMNS, **COMPARISON_COLUMNS, **KERNEL_COLUMNS,
                  **KERNEL_COMPARISON_COLUMNS}


def config_snapshot(point: Point) -> dict:
    """The point's training config as plain JSON values, compared across re-runs."""
    return json.loads(point.config.to_json())


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl ([] if there is none)."""
    path = workdir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curves(metrics: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{"loss": [(step, train loss)], "eval_loss": [(step, held-out loss)]}."""
    return {key: [(row["step"], row[key]) for row in metrics if row.get(key) is not None]
            for key in ("loss", "eval_loss")}


def read_result(point_dir: pathlib.Path) -> dict | None:
    path = point_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_result(point_dir: pathlib.Path, result: dict) -> None:
    tmp = point_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(point_dir / RESULT_FILE)


def recorded_result(point_dir: pathlib.Path, point: Point) -> dict | None:
    """The point's result.json if it records this very config (fields added to the schema
    since it was written count at their defaults, as when a run resumes), else None."""
    result = read_result(point_dir)
    if (result is None or json.loads(with_defaults(result.get("config") or {}).to_json())
            != config_snapshot(point)):
        return None
    return result


def finished_result(point_dir: pathlib.Path, point: Point) -> dict | None:
    """The point's result if it finished with this very config: result.json records it
    (`recorded_result`) at the last step, and the checkpoint at the last step exists (or
    the folder was laid out from a committed record, `mqa.sweep.record`). Otherwise None
    (train or resume it)."""
    result = recorded_result(point_dir, point)
    steps = point.config.train.steps
    if (result is None or result.get("step") != steps
            or not ((point_dir / "checkpoints" / str(steps)).is_dir() or result.get(RESTORED))):
        return None
    return result


def new_result(point: Point, trained: dict) -> dict:
    """result.json's contents for a point whose training returned `trained`."""
    return {"name": point.name, "values": point.values, "config": config_snapshot(point),
            **trained}


def swept_columns(fields: Iterable[str]) -> list[str]:
    """The swept fields shown as columns: all but the seed, `model.num_kv_heads` (always a
    column of its own) and named points (their name is the configuration's)."""
    return [name for name in fields if name not in ("model.num_kv_heads", SEED_FIELD, POINTS_FIELD)]


def seed_columns(fields: Iterable[str], tuned: Iterable[str] = ()) -> list[str]:
    """Columns of results_by_seed.csv: the point, its configuration, the swept fields,
    the tuned field's column (`tuned`, in a tuning sweep), the seed, the model's sizes, its
    final held-out metrics and its configuration's speeds."""
    return ["point", "configuration", *swept_columns(fields), *tuned, *SEED_COLUMNS]


def configuration_columns(fields: Iterable[str], tuned: Iterable[str] = ()) -> list[str]:
    """Columns of results.csv / results.md."""
    return ["configuration", *swept_columns(fields), *tuned, *CONFIGURATION_COLUMNS]


def seed_row(point: Point, result: dict, model_config: ModelConfig, speeds: dict,
             tuned: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row of results_by_seed.csv. result: its held-out metrics (`EVAL_KEYS`: the
    point's result.json, or in a tuning sweep its test half's); model_config: the point's
    model as trained (from its config.json, so a BPE tokenizer's vocabulary size counts);
    speeds: its configuration's side-by-side timings (its `mqa.sweep.speeds` entry);
    tuned: {column: chosen value} in a tuning sweep."""
    values = {name: value["name"] if name == POINTS_FIELD else value
              for name, value in point.values.items() if name != SEED_FIELD}
    decode = speeds.get("decode") or {}
    kernel = {"decode_kernel_tokens_per_sec": speeds["decode_kernel"]["tokens_per_sec"]} \
        if "decode_kernel" in speeds else {}
    return {
        "point": point.name, "configuration": point.configuration, **values, **(tuned or {}),
        "seed": point.seed,
        "attention": model_config.attention,
        "num_kv_heads": model_config.num_kv_heads,
        "mlp_dim": model_config.mlp_dim,
        "params": accounting.param_count(model_config),
        # at the context decoding is timed at (a sliding window's ring makes it depend on it)
        "kv_cache_bytes_per_token": accounting.kv_cache_bytes_per_token(
            model_config, context=decode.get("context")),
        **{key: result[key] for key in EVAL_KEYS},
        "train_tokens_per_sec": speeds.get("train_tokens_per_sec"),
        "decode_context": decode.get("context"),
        "decode_tokens_per_sec": decode.get("tokens_per_sec"),
        **kernel,
    }


def configuration_rows(seed_rows: list[dict], baseline: str,
                       contrasts: Iterable[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """One row per configuration (in order of first appearance) summarising its seeds,
    with paired differences against the configuration named `baseline`, their p-values
    Holm-adjusted over the family of these and `contrasts` (`mqa.sweep.family`)."""
    groups: dict[str, list[dict]] = {}
    for row in seed_rows:
        groups.setdefault(row["configuration"], []).append(row)
    if baseline not in groups:
        raise ValueError(f"baseline {baseline!r} is not one of the configurations {list(groups)}")
    tested = family.comparison_family(groups, baseline, contrasts)
    others = [name for name in groups if name != baseline]
    differences = {metric: dict(zip(others, family.compared(seed_rows, tested, metric,
                                                            [(name, baseline) for name in others])))
                   for metric in SUMMARIZED}
    table = []
    for name, rows in groups.items():
        first = rows[0]
        row = {key: value for key, value in first.items()
               if key not in SEED_COLUMNS or key in MODEL_COLUMNS or key in SPEED_COLUMNS}
        row.pop("point", None)
        row["n"] = len(rows)
        for metric in SUMMARIZED:
            summary = stats.summarize([r[metric] for r in rows])
            # The baseline against itself: a difference of zero, no test.
            several = len(rows) > 1
            diff = differences[metric].get(name) or {
                "mean": 0.0, "ci95": 0.0 if several else None, "p": None, "p_holm": None,
                "resolved": False if several else None}
            row.update({f"{metric}_mean": summary["mean"], f"{metric}_sd": summary["sd"],
                        f"{metric}_ci95": summary["ci95"], f"{metric}_diff": diff["mean"],
                        f"{metric}_diff_ci95": diff["ci95"], f"{metric}_diff_p": diff["p"],
                        f"{metric}_diff_p_holm": diff["p_holm"],
                        f"{metric}_diff_resolved": diff["resolved"]})
        table.append(row)
    return table


def comparison_rows(seed_rows: list[dict], baseline: str, declared: list[tuple[str, str]],
                    asked: list[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """For each contrast (configuration, against), those `declared` in the config and then
    those `asked` for with --compare (one row per pair as named): the seed-paired
    difference in held-out loss (configuration minus against) with its 95% interval, its
    p-value Holm-adjusted over the sweep's family (against `baseline`, and all these
    contrasts), and the ratios of their KV-cache bytes per token and decoding tokens/s
    (configuration over against)."""
    first = {}
    for row in seed_rows:
        first.setdefault(row["configuration"], row)
    tested = family.comparison_family(first, baseline, [*declared, *asked])
    pairs = list(dict.fromkeys([*declared, *asked]))
    table = []
    for (name, against), diff in zip(pairs, family.compared(seed_rows, tested, "eval_loss", pairs)):
        a, b = first[name], first[against]
        speeds = (a.get("decode_tokens_per_sec"), b.get("decode_tokens_per_sec"))
        kernel = (a.get("decode_kernel_tokens_per_sec"), b.get("decode_kernel_tokens_per_sec"))
        table.append({"configuration": name, "against": against,
                      "declared": (name, against) in declared, "n": diff["n"],
                      "eval_loss_diff": diff["mean"], "eval_loss_diff_ci95": diff["ci95"],
                      "eval_loss_diff_p": diff["p"], "eval_loss_diff_p_holm": diff["p_holm"],
                      "eval_loss_diff_resolved": diff["resolved"],
                      "kv_cache_ratio": a["kv_cache_bytes_per_token"] / b["kv_cache_bytes_per_token"],
                      "decode_speed_ratio": speeds[0] / speeds[1] if all(speeds) else None,
                      **({"decode_kernel_speed_ratio": kernel[0] / kernel[1]} if all(kernel) else {})})
    return table


def write_csv(rows: list[dict], columns: list[str], path: pathlib.Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table; numbers right-aligned and formatted per METRIC_COLUMNS; a
    difference (a column ending in "_diff") in bold where its "_resolved" column is true."""
    def cell(row: dict, column: str) -> str:
        value = row.get(column)
        if value is None:
            return ""
        if isinstance(value, bool):
            return "yes" if value else "no"
        text = METRIC_COLUMNS[column].format(value) if column in METRIC_COLUMNS else str(value)
        return f"**{text}**" if column.endswith("_diff") and row.get(f"{column}_resolved") is True else text

    align = ["---" if c in ("point", "configuration") else "---:" for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def family_sizes(configurations: list[str], baseline: str, declared: list[tuple[str, str]],
                 asked: list[tuple[str, str]]) -> tuple[int, int, int]:
    """(comparisons against the baseline, declared contrasts, --compare ones) that the
    family counts, each pair once (`mqa.sweep.family.comparison_family`)."""
    against = len(configurations) - 1
    with_declared = len(family.comparison_family(configurations, baseline, declared))
    everything = len(family.comparison_family(configurations, baseline, [*declared, *asked]))
    return against, with_declared - against, everything - with_declared


def write_tables(workdir: pathlib.Path, fields: Iterable[str], seed_rows: list[dict],
                 rows: list[dict], baseline: str, declared: list[tuple[str, str]] = (),
                 asked: list[tuple[str, str]] = (), tuned: Iterable[str] = (),
                 note: str = "") -> str:
    """Writes WORKDIR/results.csv, results_by_seed.csv, comparisons.csv (when there are
    contrasts, `declared` in the config or `asked` for with --compare; else any earlier
    one is removed) and results.md;
    returns the markdown tables (what results.md holds after its lines about the
    statistics). fields: the swept dotted names; seed_rows and rows: `seed_row`s and their
    `configuration_rows` against `baseline` with these contrasts; tuned: the tuned field's
    column (a tuning sweep); note: a sentence for results.md's head (what was scored)."""
    fields, declared, asked = list(fields), list(declared), list(asked)
    kernel = any("decode_kernel_tokens_per_sec" in row for row in seed_rows)  # --decode_kernel
    columns = [*configuration_columns(fields, tuned), *(KERNEL_COLUMNS if kernel else ())]
    table = markdown_table(rows, columns)
    write_csv(rows, columns, workdir / "results.csv")
    write_csv(seed_rows, [*seed_columns(fields, tuned), *(KERNEL_COLUMNS if kernel else ())],
              workdir / "results_by_seed.csv")
    if declared or asked:
        compared = comparison_rows(seed_rows, baseline, declared, asked)
        compared_columns = [*COMPARISON_COLUMNS, *(KERNEL_COMPARISON_COLUMNS if kernel else ())]
        write_csv(compared, compared_columns, workdir / "comparisons.csv")
        table += ("\nContrasts (declared: in the config's sweep.contrasts; the others from "
                  "--compare): seed-paired differences in held-out loss (configuration minus "
                  "against, 95% interval, p and Holm-adjusted p as above), and the ratios of "
                  "KV-cache bytes and decoding speed:\n\n"
                  + markdown_table(compared, compared_columns))
    else:  # an earlier run's contrasts are not this one's
        (workdir / "comparisons.csv").unlink(missing_ok=True)
    against, declared_count, asked_count = family_sizes([r["configuration"] for r in rows],
                                                        baseline, declared, asked)
    (workdir / "results.md").write_text(
        f"Baseline: {baseline}. {note}Means over seeds with 95% t intervals (half-widths); "
        "differences are seed-paired against the baseline, p from the two-sided paired "
        f"t-test, p_holm that p Holm-adjusted over the family of "
        f"{against + declared_count + asked_count} comparisons ({against} against the "
        f"baseline, {declared_count} declared contrasts, {asked_count} from --compare; each "
        "metric its own family); resolved (and bold): p_holm < 0.05.\n\n" + table)
    return table
