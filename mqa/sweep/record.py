"""Finished runs recorded in the repository, so that a sweep continues from a fresh clone.

A sweep whose config names a record folder (`sweep.record`, e.g. a folder under
benchmarks/results/ that is committed) writes one small JSON file there for each point as it
finishes: RECORD/<point>.json, and RECORD/tuning/<point>.json for a tuning run. It holds
the point's result.json, its config.json and its metrics.jsonl rows (a few KB). A later run
of the same sweep, on any machine, takes a recorded point whose config is the one it would
train as finished: it lays out the point's folder from the record (config, metrics and
result; no checkpoint) and skips it. So a long experiment can be spread over sessions that
each commit the records of the runs they finished.

Absolute paths in a recorded config (the corpus a config names by its own location) are
stored relative to the record folder, so a clone elsewhere on disk matches them.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import ml_collections

from mqa import workdir as workdir_lib
from mqa.config import ConfigError, with_defaults
from mqa.sweep import results
from mqa.sweep.points import Point, sweep_option

RECORD = "record"     # sweep.record: the folder finished runs are recorded in ('' or absent: none)


def record_dir(config: ml_collections.ConfigDict, subfolder: str = "") -> pathlib.Path | None:
    """The config's `sweep.record` folder (joined with `subfolder`), or None."""
    value = sweep_option(config, RECORD, "")
    if not isinstance(value, str):
        raise ConfigError(f"sweep.record={value!r} must be a folder path (a string)")
    if not value:
        return None
    return pathlib.Path(value) / subfolder if subfolder else pathlib.Path(value)


def portable(value: Any, record: pathlib.Path) -> Any:
    """`value` (plain JSON) with every absolute path made relative to `record`."""
    if isinstance(value, dict):
        return {key: portable(item, record) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item, record) for item in value]
    if isinstance(value, str) and os.path.isabs(value):
        return "@record/" + os.path.relpath(value, record.resolve())
    return value


def write_record(record: pathlib.Path, point_dir: pathlib.Path, result: dict) -> None:
    """Records the finished point in POINT_DIR (its `result`) as RECORD/<point>.json."""
    record.mkdir(parents=True, exist_ok=True)
    entry = {"result": portable(result, record),
             "config": portable(json.loads((point_dir / workdir_lib.CONFIG_FILE).read_text()), record),
             "metrics": results.read_metrics(point_dir)}
    target = record / f"{point_dir.name}.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entry, indent=1) + "\n")
    tmp.replace(target)


def restore(record: pathlib.Path, point_dir: pathlib.Path, point: Point,
            needs: tuple[str, ...] = ()) -> dict | None:
    """The point's recorded result when RECORD/<point>.json records this very config (fields
    added to the schema since it was written counting at their defaults, as when a run
    resumes; and
    holds the result keys `needs`, which a folder without checkpoints could not compute),
    its folder laid out from the record (config.json, metrics.jsonl, result.json marked
    `results.RESTORED`); None when there is no such record or the folder already holds a run."""
    path = record / f"{point.name}.json"
    if not path.exists() or (point_dir / "checkpoints").exists():
        return None
    entry = json.loads(path.read_text())
    recorded = json.loads(with_defaults(entry["result"].get("config") or {}).to_json())
    if (recorded != portable(results.config_snapshot(point), record)  # new fields at their defaults
            or any(key not in entry["result"] for key in needs)):
        return None
    point_dir.mkdir(parents=True, exist_ok=True)
    result = {**entry["result"], "config": results.config_snapshot(point), results.RESTORED: str(path)}
    saved = {**entry["config"], "data": {**entry["config"]["data"], **point.config.data.to_dict()}}
    (point_dir / workdir_lib.CONFIG_FILE).write_text(json.dumps(saved, indent=2))
    (point_dir / results.METRICS_FILE).write_text(
        "".join(json.dumps(row) + "\n" for row in entry["metrics"]))
    results.write_result(point_dir, result)
    return result
