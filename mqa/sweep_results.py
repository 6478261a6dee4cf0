"""A sweep's results: each point's result.json, its metrics, and the table of all points.

`POINT_DIR/result.json` is written when a point's training has finished:

  {"name", "values", "config"  (the point's training config, as trained),
   "step", "eval_loss", "eval_perplexity", "eval_bits_per_byte", "eval_tokens",
   "train_tokens_per_sec", "decode": {"context", "batch", "steps", "tokens_per_sec"}}

The table has one row per point with the columns of `table_columns`.
"""

from __future__ import annotations

import csv
import json
import pathlib
import statistics
from typing import Any, Iterable

from mqa import accounting
from mqa.config import ModelConfig
from mqa.sweep import Point

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
# Always in the table after the swept fields: (column, markdown format).
METRIC_COLUMNS = {
    "num_kv_heads": "{:d}",
    "mlp_dim": "{:d}",
    "params": "{:,d}",
    "kv_cache_bytes_per_token": "{:,d}",
    "train_tokens_per_sec": "{:,.0f}",
    "eval_loss": "{:.4f}",
    "eval_perplexity": "{:.3f}",
    "eval_bits_per_byte": "{:.4f}",
    "decode_context": "{:d}",
    "decode_tokens_per_sec": "{:,.0f}",
}


def config_snapshot(point: Point) -> dict:
    """The point's training config as plain JSON values, compared across re-runs."""
    return json.loads(point.config.to_json())


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl ([] if there is none)."""
    path = workdir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def median_train_tokens_per_sec(metrics: list[dict]) -> float | None:
    """The median `tokens_per_sec` over logged steps after the first logged one (all of
    them if there is only one); None if none was logged."""
    rates = [row["tokens_per_sec"] for row in metrics if row.get("tokens_per_sec")]
    rates = rates[1:] or rates
    return statistics.median(rates) if rates else None


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
    """The point's result if it finished with this very config: result.json records it,
    and the checkpoint at the last step exists. Otherwise None (train or resume it)."""
    result = read_result(point_dir)
    steps = point.config.train.steps
    if (result is None or result.get("config") != config_snapshot(point)
            or result.get("step") != steps or not (point_dir / "checkpoints" / str(steps)).is_dir()):
        return None
    return result


def new_result(point: Point, trained: dict, metrics: list[dict]) -> dict:
    """result.json's contents for a point whose training returned `trained`."""
    return {"name": point.name, "values": point.values, "config": config_snapshot(point),
            **trained, "train_tokens_per_sec": median_train_tokens_per_sec(metrics)}


def table_columns(fields: Iterable[str]) -> list[str]:
    """"point", the swept fields (but `model.num_kv_heads`, always a column), the metrics."""
    swept = [name for name in fields if name != "model.num_kv_heads"]
    return ["point", *swept, *METRIC_COLUMNS]


def table_row(point: Point, result: dict, model_config: ModelConfig) -> dict[str, Any]:
    """One row of the table. model_config: the point's model as trained (from its
    config.json, so a BPE tokenizer's vocabulary size counts)."""
    return {
        "point": point.name, **point.values,
        "num_kv_heads": model_config.num_kv_heads,
        "mlp_dim": model_config.mlp_dim,
        "params": accounting.param_count(model_config),
        "kv_cache_bytes_per_token": accounting.kv_cache_bytes_per_token(model_config),
        "train_tokens_per_sec": result.get("train_tokens_per_sec"),
        "eval_loss": result["eval_loss"],
        "eval_perplexity": result["eval_perplexity"],
        "eval_bits_per_byte": result["eval_bits_per_byte"],
        "decode_context": (result.get("decode") or {}).get("context"),
        "decode_tokens_per_sec": (result.get("decode") or {}).get("tokens_per_sec"),
    }


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
        if column in METRIC_COLUMNS:
            return METRIC_COLUMNS[column].format(value)
        return str(value).lower() if isinstance(value, bool) else str(value)

    align = ["---" if c == "point" else "---:" for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
