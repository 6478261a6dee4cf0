"""A sweep's results: each point's result.json, its metrics, and the tables of all points.

`POINT_DIR/result.json` is written when a point's training has finished:

  {"name", "values", "config"  (the point's training config, as trained),
   "step", "eval_loss", "eval_perplexity", "eval_bits_per_byte", "eval_tokens"
   (the final evaluation, over the whole held-out split)}

Speeds are measured per configuration, side by side, and kept in `WORKDIR/speeds.json`
(`mqa.sweep.speeds`). Two tables: `results_by_seed.csv` has a row per point (`seed_row`,
`SEED_COLUMNS`); `results.csv` / `results.md` a row per configuration
(`configuration_rows`), with each held-out metric's mean, sample sd and 95% interval over
seeds, and its seed-paired difference against the baseline configuration with that
difference's interval; `comparisons.csv` the pairs asked for (`comparison_rows`).
`write_tables` writes them all.
"""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Any, Iterable

from mqa import accounting
from mqa import statistics as stats
from mqa.config import ModelConfig, with_defaults
from mqa.sweep.points import POINTS_FIELD, SEED_FIELD, Point

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
SUMMARIZED = ("eval_loss", "eval_bits_per_byte")  # held-out metrics summarised over seeds
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
        ("_diff_ci95", "{:.4f}"), ("_diff_resolved", "{}"))},
    **SPEED_COLUMNS,
}
# comparisons.csv: a configuration against another, seed-paired (`comparison_rows`)
COMPARISON_COLUMNS = {"configuration": "{}", "against": "{}", "n": "{:d}",
                      "eval_loss_diff": "{:+.4f}", "eval_loss_diff_ci95": "{:.4f}",
                      "eval_loss_diff_resolved": "{}", "kv_cache_ratio": "{:.3f}",
                      "decode_speed_ratio": "{:.2f}"}
METRIC_COLUMNS = {**SEED_COLUMNS, **CONFIGURATION_COLUMNS, **COMPARISON_COLUMNS}


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


def finished_result(point_dir: pathlib.Path, point: Point) -> dict | None:
    """The point's result if it finished with this very config: result.json records it
    (fields added to the schema since it was written count at their defaults, as when a
    run resumes), and the checkpoint at the last step exists. Otherwise None (train or
    resume it)."""
    result = read_result(point_dir)
    steps = point.config.train.steps
    if (result is None or result.get("step") != steps
            or not (point_dir / "checkpoints" / str(steps)).is_dir()
            or json.loads(with_defaults(result.get("config") or {}).to_json()) != config_snapshot(point)):
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


def seed_columns(fields: Iterable[str]) -> list[str]:
    """Columns of results_by_seed.csv: the point, its configuration, the swept fields,
    the seed, the model's sizes, its final held-out metrics and its configuration's speeds."""
    return ["point", "configuration", *swept_columns(fields), *SEED_COLUMNS]


def configuration_columns(fields: Iterable[str]) -> list[str]:
    """Columns of results.csv / results.md."""
    return ["configuration", *swept_columns(fields), *CONFIGURATION_COLUMNS]


def seed_row(point: Point, result: dict, model_config: ModelConfig, speeds: dict) -> dict[str, Any]:
    """One row of results_by_seed.csv. model_config: the point's model as trained (from
    its config.json, so a BPE tokenizer's vocabulary size counts); speeds: its
    configuration's side-by-side timings (its `mqa.sweep.speeds` entry)."""
    values = {name: value["name"] if name == POINTS_FIELD else value
              for name, value in point.values.items() if name != SEED_FIELD}
    decode = speeds.get("decode") or {}
    return {
        "point": point.name, "configuration": point.configuration, **values,
        "seed": point.seed,
        "attention": model_config.attention,
        "num_kv_heads": model_config.num_kv_heads,
        "mlp_dim": model_config.mlp_dim,
        "params": accounting.param_count(model_config),
        # at the context decoding is timed at (a sliding window's ring makes it depend on it)
        "kv_cache_bytes_per_token": accounting.kv_cache_bytes_per_token(
            model_config, context=decode.get("context")),
        **{key: result[key] for key in ("eval_loss", "eval_perplexity", "eval_bits_per_byte",
                                        "eval_tokens")},
        "train_tokens_per_sec": speeds.get("train_tokens_per_sec"),
        "decode_context": decode.get("context"),
        "decode_tokens_per_sec": decode.get("tokens_per_sec"),
    }


def configuration_rows(seed_rows: list[dict], baseline: str) -> list[dict[str, Any]]:
    """One row per configuration (in order of first appearance) summarising its seeds,
    with paired differences against the configuration named `baseline`."""
    groups: dict[str, list[dict]] = {}
    for row in seed_rows:
        groups.setdefault(row["configuration"], []).append(row)
    if baseline not in groups:
        raise ValueError(f"baseline {baseline!r} is not one of the configurations {list(groups)}")
    by_seed = {name: {metric: {r["seed"]: r[metric] for r in rows} for metric in SUMMARIZED}
               for name, rows in groups.items()}
    table = []
    for name, rows in groups.items():
        first = rows[0]
        row = {key: value for key, value in first.items()
               if key not in SEED_COLUMNS or key in MODEL_COLUMNS or key in SPEED_COLUMNS}
        row.pop("point", None)
        row["n"] = len(rows)
        for metric in SUMMARIZED:
            summary = stats.summarize([r[metric] for r in rows])
            diff = stats.paired_difference(by_seed[name][metric], by_seed[baseline][metric])
            row.update({f"{metric}_mean": summary["mean"], f"{metric}_sd": summary["sd"],
                        f"{metric}_ci95": summary["ci95"], f"{metric}_diff": diff["mean"],
                        f"{metric}_diff_ci95": diff["ci95"],
                        f"{metric}_diff_resolved": diff["resolved"]})
        table.append(row)
    return table


def comparison_rows(seed_rows: list[dict], pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """For each (configuration, against): the seed-paired difference in held-out loss
    (configuration minus against) with its 95% interval, and the ratios of their KV-cache
    bytes per token and decoding tokens/s (configuration over against)."""
    first = {}
    losses: dict[str, dict[int, float]] = {}
    for row in seed_rows:
        first.setdefault(row["configuration"], row)
        losses.setdefault(row["configuration"], {})[row["seed"]] = row["eval_loss"]
    table = []
    for name, against in pairs:
        diff = stats.paired_difference(losses[name], losses[against])
        a, b = first[name], first[against]
        speeds = (a.get("decode_tokens_per_sec"), b.get("decode_tokens_per_sec"))
        table.append({"configuration": name, "against": against, "n": diff["n"],
                      "eval_loss_diff": diff["mean"], "eval_loss_diff_ci95": diff["ci95"],
                      "eval_loss_diff_resolved": diff["resolved"],
                      "kv_cache_ratio": a["kv_cache_bytes_per_token"] / b["kv_cache_bytes_per_token"],
                      "decode_speed_ratio": speeds[0] / speeds[1] if all(speeds) else None})
    return table


def write_csv(rows: list[dict], columns: list[str], path: pathlib.Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table; numbers right-aligned and formatted per METRIC_COLUMNS."""
    def cell(column: str, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "yes" if value else "no"
        if column in METRIC_COLUMNS:
            return METRIC_COLUMNS[column].format(value)
        return str(value).lower() if isinstance(value, bool) else str(value)

    align = ["---" if c in ("point", "configuration") else "---:" for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_tables(workdir: pathlib.Path, fields: Iterable[str], seed_rows: list[dict],
                 rows: list[dict], baseline: str, comparisons: list[tuple[str, str]]) -> str:
    """Writes WORKDIR/results.csv, results_by_seed.csv, comparisons.csv (when there are
    `comparisons`) and results.md; returns the markdown tables (what results.md holds
    after its line about the baseline). fields: the swept dotted names; seed_rows and
    rows: `seed_row`s and their `configuration_rows` against `baseline`."""
    fields = list(fields)
    columns = configuration_columns(fields)
    table = markdown_table(rows, columns)
    write_csv(rows, columns, workdir / "results.csv")
    write_csv(seed_rows, seed_columns(fields), workdir / "results_by_seed.csv")
    if comparisons:
        compared = comparison_rows(seed_rows, comparisons)
        write_csv(compared, list(COMPARISON_COLUMNS), workdir / "comparisons.csv")
        table += ("\nSeed-paired differences in held-out loss (configuration minus against, "
                  "95% interval), and the ratios of KV-cache bytes and decoding speed:\n\n"
                  + markdown_table(compared, list(COMPARISON_COLUMNS)))
    (workdir / "results.md").write_text(
        f"Baseline: {baseline}. Means over seeds with 95% t intervals (half-widths); "
        "differences are seed-paired against the baseline; resolved: the difference's "
        "interval excludes zero.\n\n" + table)
    return table
