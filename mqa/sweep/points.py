"""A sweep: fields and their values, expanded into points (the cartesian product).

A sweep config is a training config plus a `sweep` field that maps dotted field names to
lists of values, written either with dotted keys or as nested sections:

  config.sweep = ml_collections.ConfigDict({"model.num_kv_heads": [8, 4, 2, 1]},
                                           allow_dotted_keys=True)
  config.sweep = {"model": {"num_kv_heads": (8, 4, 2, 1)}}   # the same sweep

Configurations that are not a cartesian product are listed by name under `points`, each
a mapping of dotted fields to values; they combine with any other swept field:

  config.sweep = {"points": [{"name": "MHA", "model.num_kv_heads": 8},
                             {"name": "MQA+CLA2", "model.num_kv_heads": 1,
                              "model.kv_share_every": 2}]}

`ConfigDict` keeps keys sorted, so the points come in a stable order: fields sorted by
name, the first field outermost, each field's values in the order listed. Each point is
the training config (the `sweep` field removed) with its values set, validated like any
training config, and is named from its values for its sub-workdir:
`num_kv_heads=8`, or `num_kv_heads=8__seed=0` for several fields (`MHA__seed=0` with
named points).

Seeds are a field like any other (`train.seed`); `with_seeds` adds it. A point's
*configuration* is its values without the seed: the statistics compare configurations
over seeds (`mqa.statistics`), each against a baseline configuration
(`baseline_configuration`) and in the pairs the config declares or --compare asks for
(`compared_pairs`).

Besides fields, the `sweep` field may hold the sweep's options (`SWEEP_OPTIONS`), which
are not swept: `contrasts`, a list of "CONFIGURATION:AGAINST" pairs declared before any
result exists (`declared_contrasts`), `tune` / `tune_seeds`, a field each
configuration is tuned over (`mqa.sweep.tuning`), and `record`, a folder where finished
runs are recorded so that the sweep continues from a fresh clone (`mqa.sweep.record`):

  config.sweep = ml_collections.ConfigDict({
      "points": [...], "train.seed": list(range(8)),
      "contrasts": ["MQA:MHA", "GTA-2:GQA-2"],
      "tune": {"train.learning_rate": [1e-3, 2e-3, 4e-3]}, "tune_seeds": 1,
  }, allow_dotted_keys=True)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any, Iterable, Mapping

import ml_collections

from mqa.config import ConfigError, get_dotted, set_dotted, set_from_string, validate

SWEEP_FIELD = "sweep"
POINTS_FIELD = "points"  # a list of named configurations: {"name": ..., "model.x": ...}
SEED_FIELD = "train.seed"
CONTRASTS = "contrasts"        # sweep.contrasts: ["A:B", ...] (`declared_contrasts`)
SWEEP_OPTIONS = (CONTRASTS, "tune", "tune_seeds", "record")  # sweep keys that are not swept fields


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep: its sub-workdir name, its swept values and its full config."""

    name: str
    values: dict[str, Any]                  # dotted field name -> value, in sweep order
    config: ml_collections.ConfigDict       # a validated training config

    @property
    def configuration(self) -> str:
        """The name of the point's values without its seed: what seeds are averaged over."""
        return configuration_name(self.values)

    @property
    def seed(self) -> int:
        return int(self.config.train.seed)


def training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A deep copy of `config` without its `sweep` field: what `mqa.config.validate` accepts."""
    values = json.loads(config.to_json())
    values.pop(SWEEP_FIELD, None)
    return ml_collections.ConfigDict(values)


def sweep_fields(config: ml_collections.ConfigDict) -> dict[str, list]:
    """The config's `sweep` field flattened to {dotted name: [values]} ({} if absent),
    without its options (`SWEEP_OPTIONS`)."""
    if SWEEP_FIELD not in config:
        return {}
    return field_lists(config[SWEEP_FIELD], skip=SWEEP_OPTIONS)


def field_lists(node: Any, *, skip: Iterable[str] = (), named_points: bool = True,
                what: str = "sweep field") -> dict[str, list]:
    """Mappings of fields to value lists, with dotted keys or nested sections, flattened to
    {dotted name: [values]}; keys in `skip` left out; `points` read as named points
    (`named_points`). A ConfigError, naming the field as `what`, for a value that is not
    a list."""
    fields = {}

    def flatten(node: Any, prefix: str) -> None:
        if prefix in skip:
            return
        if prefix == POINTS_FIELD and named_points:
            fields[POINTS_FIELD] = _named_points(node)
            return
        if isinstance(node, (ml_collections.ConfigDict, Mapping)):
            for key in node.keys():
                flatten(node[key], f"{prefix}.{key}" if prefix else key)
            return
        if not isinstance(node, (list, tuple)):
            raise ConfigError(f"{what} {prefix!r} must be a list of values, got {node!r}")
        fields[prefix] = list(node)

    flatten(node, "")
    return fields


def _named_points(node: Any) -> list[dict]:
    """The `points` sweep field checked: a list of mappings, each with a unique "name"."""
    if not isinstance(node, (list, tuple)) or not node:
        raise ConfigError(f"sweep field 'points' must be a non-empty list of "
                          f"{{'name': ..., 'section.field': value}} mappings, got {node!r}")
    named = []
    for item in node:
        item = dict(item.items()) if hasattr(item, "items") else item
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ConfigError(f"each sweep point needs a non-empty 'name' and its fields, got {item!r}")
        named.append(item)
    names = [item["name"] for item in named]
    if len(set(names)) < len(names):
        raise ConfigError(f"sweep point names must be unique, got {names}")
    return named


def with_seeds(fields: Mapping[str, list], seeds: int) -> dict[str, list]:
    """`fields` with `train.seed` swept over 0..seeds-1 (the innermost field), in place of
    any `train.seed` values the sweep lists."""
    if seeds < 1:
        raise ConfigError(f"--seeds={seeds} must be >= 1 (the number of seeds per configuration)")
    return {**{name: values for name, values in fields.items() if name != SEED_FIELD},
            SEED_FIELD: list(range(seeds))}


def configuration_name(values: Mapping[str, Any]) -> str:
    """A point's name without its seed ("config" when only seeds are swept)."""
    rest = {name: value for name, value in values.items() if name != SEED_FIELD}
    return point_name(rest) if rest else "config"


def sweep_option(config: ml_collections.ConfigDict, name: str, default: Any = None) -> Any:
    """The sweep's option `name` (one of `SWEEP_OPTIONS`): config.sweep[name], or `default`."""
    sweep = config.get(SWEEP_FIELD) if hasattr(config, "get") else None
    if sweep is None or not hasattr(sweep, "keys") or name not in sweep:
        return default
    return sweep[name]


def declared_contrasts(config: ml_collections.ConfigDict) -> list[str]:
    """The config's `sweep.contrasts` (a list of "CONFIGURATION:AGAINST" strings; [] if
    none); a ConfigError when it is not such a list."""
    contrasts = sweep_option(config, CONTRASTS, [])
    if isinstance(contrasts, str) or not isinstance(contrasts, (list, tuple)) or not all(
            isinstance(item, str) for item in contrasts):
        raise ConfigError(f"sweep.contrasts={contrasts!r} must be a list of "
                          "'CONFIGURATION:AGAINST' strings, e.g. ['MQA:MHA']")
    return list(contrasts)


def parse_sweep_flags(items: Iterable[str], config: ml_collections.ConfigDict,
                      flag: str = "--sweep") -> dict[str, list]:
    """`["model.num_kv_heads=8,4,2,1", "train.seed=0,1"]` -> {name: [typed values]}.

    Each value is read as `--config.NAME=VALUE` would read it (the type of the config's
    current value), so a misspelled name or a bad value is a one-line `ConfigError`;
    `flag` names the option in it.
    """
    base = training_config(config)
    fields = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"{flag}={item!r} must look like 'section.field=value,value,...'")
        values = []
        for value_text in filter(None, (v.strip() for v in text.split(","))):
            scratch = ml_collections.ConfigDict(base.to_dict())
            set_from_string(scratch, name, value_text)
            values.append(get_dotted(scratch, name))
        fields[name] = values
    return fields


def points(config: ml_collections.ConfigDict, fields: Mapping[str, list]) -> list[Point]:
    """The cartesian product of `fields` over `config`, each point's config validated.

    Raises `ConfigError` naming the point and the value for the first invalid point, so a
    sweep stops before training anything.
    """
    if not fields:
        raise ConfigError("no sweep: add a `sweep` field to the config, e.g. "
                          "{'model.num_kv_heads': [8, 4, 2, 1]}, or pass "
                          "--sweep=model.num_kv_heads=8,4,2,1")
    for name, values in fields.items():
        if not values:
            raise ConfigError(f"sweep field {name!r} has no values")
    base = training_config(config)
    names = list(fields)
    result = []
    for combination in itertools.product(*(fields[name] for name in names)):
        values = dict(zip(names, combination))
        point_config = ml_collections.ConfigDict(base.to_dict())
        for name, value in values.items():
            if name == POINTS_FIELD:
                for field, field_value in value.items():
                    if field != "name":
                        _set(point_config, field, field_value)
            else:
                _set(point_config, name, value)
        label = point_name(values)
        try:
            validate(point_config)
        except ConfigError as error:
            raise ConfigError(f"sweep point {label}: {error}") from None
        result.append(Point(label, values, point_config))
    if len({p.name for p in result}) < len(result):
        raise ConfigError(f"sweep values give duplicate point names: {[p.name for p in result]}")
    return result


def configurations(plan: Iterable[Point]) -> list[str]:
    """The plan's configuration names, in order of first appearance."""
    return list(dict.fromkeys(point.configuration for point in plan))


def only_configurations(plan: list[Point], names: Iterable[str]) -> list[Point]:
    """The plan's points of the configurations `names` lists (`--only`), in that order
    (each configuration's seeds in plan order); a ConfigError naming the configurations for
    a name that is not one of them."""
    known = configurations(plan)
    wanted = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    for name in wanted:
        if name not in known:
            raise ConfigError(f"--only={name!r} is not a configuration of this sweep; its "
                              f"configurations: {', '.join(known)}")
    return [point for name in wanted for point in plan if point.configuration == name]


def baseline_configuration(plan: list[Point], items: Iterable[str],
                           config: ml_collections.ConfigDict) -> str:
    """The configuration that `items` (FIELD=VALUE strings, each value read like a
    `parse_sweep_flags` value; `points=NAME` for a named point) name, or the plan's first
    configuration when there are none; a ConfigError naming the choices when they do not
    name exactly one configuration."""
    items = list(items)
    if not items:
        return plan[0].configuration
    wanted = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise ConfigError(f"--baseline={item!r} must look like 'section.field=value'")
        if name.strip() == POINTS_FIELD:
            wanted[POINTS_FIELD] = text.strip()
            continue
        wanted.update({key: values[0] for key, values in
                       parse_sweep_flags([item], config).items()})
    matches = []
    for point in plan:
        values = {key: value["name"] if key == POINTS_FIELD else value
                  for key, value in point.values.items()}
        if all(key in values and values[key] == value for key, value in wanted.items()):
            if point.configuration not in matches:
                matches.append(point.configuration)
    if len(matches) != 1:
        what = "matches no configuration" if not matches else f"matches {len(matches)} configurations"
        raise ConfigError(f"--baseline {' '.join(items)} {what}; the configurations are: "
                          f"{', '.join(configurations(plan))}")
    return matches[0]


def compared_pairs(plan: list[Point], items: Iterable[str],
                   source: str = "--compare") -> list[tuple[str, str]]:
    """`["A:B", ...]` -> [("A", "B"), ...], each name a configuration of the plan and the
    two different; a ConfigError naming the configurations when they are not (`source`:
    where the pairs come from, "--compare" or "sweep.contrasts")."""
    names = configurations(plan)
    pairs = []
    for item in items:
        name, sep, against = (part.strip() for part in item.partition(":"))
        if not sep or name not in names or against not in names or name == against:
            raise ConfigError(f"{source}={item!r} must be CONFIGURATION:AGAINST, two different "
                              f"configurations of: {', '.join(names)}")
        pairs.append((name, against))
    return pairs


def point_name(values: Mapping[str, Any]) -> str:
    """{"model.num_kv_heads": 8, "train.seed": 0} -> "num_kv_heads=8__seed=0".

    Each field is named by its last part, or in full where two fields share that part.
    Characters that cannot be in a folder name become "_".
    """
    last = [name.rpartition(".")[2] for name in values]
    parts = []
    for name, short in zip(values, last):
        if name == POINTS_FIELD:
            parts.append(_format_value(values[name]["name"]))
            continue
        label = short if last.count(short) == 1 else name
        parts.append(f"{label}={_format_value(values[name])}")
    return "__".join(parts)


def _format_value(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return "".join(c if c.isalnum() or c in "-_.+=" else "_" for c in text) or "_"


def _set(config: ml_collections.ConfigDict, name: str, value: Any) -> None:
    """`set_dotted`, its error naming the sweep field."""
    try:
        set_dotted(config, name, value)
    except ConfigError as error:
        raise ConfigError(f"sweep field {error}") from None
