"""Experiment configs: loading, command-line style overrides, and validation.

A config is an `ml_collections.ConfigDict` returned by `get_config()` in a file under
`configs/`. Every config is checked against the schema of `configs/default.py` when it is
loaded, so a typo or an impossible shape fails at once with one line that names the value
and what would be valid, not deep inside JAX.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib.util
import pathlib
from typing import Any, Iterable

import ml_collections

from mqa import accounting
from mqa.attention import BACKENDS, FAMILIES
from mqa.errors import ConfigError
from mqa.kv_cache import CACHE_DTYPES
from mqa.mlp import ACTIVATIONS
from mqa.model_config import ModelConfig
from mqa.norm import NORM_SCALES

__all__ = ["ConfigError", "ModelConfig", "default_config", "get_dotted", "load_config_file",
           "build_model_config", "set_from_string", "validate", "with_defaults"]

TRAINABLE = ("all", "attention")  # train.trainable
SAMPLINGS = ("permutation", "uniform")  # train.sampling: mqa.data.train_batch's orders (mqa.data.SAMPLINGS)
# Fields whose default differs from what runs did before the field existed: a config.json
# saved without one reads as that run ran (windows were drawn uniformly before train.sampling).
FORMER_BEHAVIOUR = {"train.sampling": "uniform"}
DTYPES = ("float32", "bfloat16")

# Fields that must be >= 1.
_POSITIVE = (
    "model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads",
    "model.num_kv_heads", "model.kv_share_every", "model.head_dim", "model.mlp_dim",
    "model.max_seq_len", "model.scan_unroll", "model.attention_block",
    "train.steps", "train.batch_size", "train.seq_len", "train.log_every",
    "train.eval_every", "train.eval_batches", "train.final_eval_tokens", "train.grad_accum",
    "train.max_nonfinite_steps", "checkpoint.every",
    "checkpoint.keep",
)


def build_model_config(section: Any = None, **overrides) -> ModelConfig:
    """The `ModelConfig` of a config's `model` section (a ConfigDict or mapping), every
    field it leaves out at `configs/default.py`'s value, with `overrides` applied.

    With `match_mha_params=True` the MLP is widened so the parameter count equals that
    of the same model with `num_kv_heads == num_heads` (Shazeer 2019).
    """
    values = default_config().model.to_dict()
    values.update(dict(section or {}))
    values.update(overrides)
    unknown = sorted(set(values) - set(ModelConfig.field_names()) - {"match_mha_params"})
    if unknown:
        raise ConfigError(_unknown_key_message(f"model.{unknown[0]}", default_config().model))
    values["rope_pairs"] = _integers("model.rope_pairs", values["rope_pairs"])  # hashable (static under jit)
    config = ModelConfig(**{name: values[name] for name in ModelConfig.field_names()})
    if values.get("match_mha_params"):
        config = dataclasses.replace(config, mlp_dim=accounting.mlp_dim_matching_mha(config))
    return config


def _integers(name: str, values: Iterable) -> tuple[int, ...]:
    """A list field of integers (the command line gives strings) as a tuple."""
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={list(values)!r} must be a list of integers") from None


def default_config() -> ml_collections.ConfigDict:
    """The schema every config is checked against, and the one source of defaults:
    `configs/default.py` (a fresh copy each call)."""
    return ml_collections.ConfigDict(copy.deepcopy(_default_values()))


@functools.lru_cache(maxsize=1)
def _default_values() -> dict:
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
    return load_config_file(path, validate_config=False).to_dict()


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
    """A config saved by a run (its config.json), with any field added to the schema since
    at its default, or at what the run did without it (`FORMER_BEHAVIOUR`), so workdirs
    written by earlier versions still load and resume as they ran."""
    def merge(defaults: dict, values: dict) -> dict:
        merged = dict(defaults)
        for key, value in values.items():
            both_sections = isinstance(value, dict) and isinstance(defaults.get(key), dict)
            merged[key] = merge(defaults[key], value) if both_sections else value
        return merged
    defaults = default_config()
    for name, value in FORMER_BEHAVIOUR.items():
        set_dotted(defaults, name, value)
    return ml_collections.ConfigDict(merge(defaults.to_dict(), dict(saved)))


def load_config_file(path: str | pathlib.Path, overrides: Iterable[str] = (), *,
                     validate_config: bool = True) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file and applies `"a.b=value"` overrides.

    The same as `--config=PATH --config.a.b=value` on the command line, for tests and tools.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_mqa_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config()
    except (TypeError, AttributeError, KeyError, ValueError) as error:  # e.g. a mistyped field
        raise ConfigError(f"{path}: {_one_line(error)}") from None
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like 'section.field=value'")
        set_from_string(config, name.strip(), text.strip())
    if validate_config:
        validate(config)
    return config


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def set_from_string(config: ml_collections.ConfigDict, name: str, text: str) -> None:
    """Sets `config`'s field `name` ("section.field") from command-line `text`, parsed as
    the field's current type; an unknown field or a value of the wrong type is a
    ConfigError naming it."""
    old = get_dotted(config, name)
    if isinstance(old, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{name}={text!r} must be a bool: true or false")
        value = text.lower() in ("true", "1")
    elif isinstance(old, (int, float)):
        try:
            value = type(old)(float(text)) if isinstance(old, float) else int(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r} must be {type(old).__name__}") from None
    elif isinstance(old, (list, tuple)):
        value = [v.strip() for v in text.strip("[]").split(",") if v.strip()]
    else:
        value = text
    set_dotted(config, name, value)


def _unknown_key_message(name: str, node: Any) -> str:
    valid = sorted(node.keys()) if hasattr(node, "keys") else []
    close = difflib.get_close_matches(name.rpartition(".")[2], valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {name!r}{hint}; valid keys here: {', '.join(valid)}"


def _check_schema(config: Any, schema: Any, prefix: str = "") -> None:
    """Unknown keys and wrong types against the default config."""
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(_unknown_key_message(name, schema))
        value, expected = config[key], schema[key]
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                raise ConfigError(f"{name} must be a section with keys {', '.join(sorted(expected))}")
            _check_schema(value, expected, name + ".")
        elif not _same_kind(value, expected):
            raise ConfigError(f"{name}={value!r} has type {type(value).__name__}; "
                              f"expected {type(expected).__name__} like the default {expected!r}")


def _same_kind(value: Any, expected: Any) -> bool:
    if isinstance(expected, bool):
        return isinstance(value, bool)
    if isinstance(expected, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(expected, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(expected, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(expected, dict):
        return isinstance(value, dict)
    return isinstance(value, type(expected))


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks a full experiment config; raises `ConfigError` naming the first bad value."""
    _check_schema(config, default_config())
    for name in _POSITIVE:
        try:
            value = get_dotted(config, name)
        except ConfigError:  # a field the config does not set
            continue
        if value < 1:
            raise ConfigError(f"{name}={value} must be >= 1")
    m = config.model
    if m.num_heads % m.num_kv_heads:
        valid = [k for k in range(1, m.num_heads + 1) if m.num_heads % k == 0]
        raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads="
                          f"{m.num_heads}; valid: {', '.join(map(str, valid))}")
    if m.num_layers % m.kv_share_every:
        valid = [k for k in range(1, m.num_layers + 1) if m.num_layers % k == 0]
        raise ConfigError(f"model.kv_share_every={m.kv_share_every} must divide model.num_layers="
                          f"{m.num_layers}; valid: {', '.join(map(str, valid))}")
    # num_heads * head_dim may differ from d_model (Gemma 3 270M: 4 x 256 against 640): the
    # projections q [m, h, d] and out [h, d, m] take any head_dim.
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim={m.head_dim} must be even (rotary embeddings rotate pairs)")
    _check_attention_family(m)
    _check_choice("model.dtype", m.dtype, DTYPES)
    _check_choice("model.mlp_activation", m.mlp_activation, tuple(ACTIVATIONS))
    _check_choice("model.norm_scale", m.norm_scale, NORM_SCALES)
    _check_choice("train.trainable", config.train.trainable, TRAINABLE)
    if not 0.0 <= config.train.distill_weight <= 1.0:
        raise ConfigError(f"train.distill_weight={config.train.distill_weight} must be in [0, 1] "
                          "(the KL's share of the loss; the LM loss has the rest)")
    _check_choice("train.sampling", config.train.sampling, SAMPLINGS)
    if config.data.tokenizer == "init_from" and not config.train.init_from:
        raise ConfigError("data.tokenizer='init_from' needs train.init_from (the workdir whose "
                          "tokenizer to train with); or use 'byte', 'bpe' or a tokenizer.json path")
    if m.match_mha_params:
        width = accounting.mlp_dim_matching_mha(build_model_config(m, match_mha_params=False))
        if width < 1:
            raise ConfigError(f"model.match_mha_params: this attention has more parameters than MHA's "
                              f"by more than the MLP holds (matched model.mlp_dim={width}); use a smaller "
                              "model.kv_latent_dim / model.q_latent_dim or match_mha_params=false")
    if config.train.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={config.train.seq_len} exceeds model.max_seq_len="
                          f"{m.max_seq_len}; use at most {m.max_seq_len} or raise model.max_seq_len")
    if not 0.0 < config.data.heldout_fraction < 1.0:
        raise ConfigError(f"data.heldout_fraction={config.data.heldout_fraction} must be in (0, 1)")
    mesh = {k: config.mesh[k] for k in ("data", "fsdp", "tensor")}
    for axis, size in mesh.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}={size} must be >= 1, or -1 to fill the remaining devices")
    if sum(size == -1 for size in mesh.values()) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {mesh}")
    return config


SINK_BACKENDS = ("einsum", "tiled")  # the backends whose masks take attention sinks
DECODE_IMPLS = ("einsum", "cpu_kernel")  # model.decode_impl: grouped attention over the cache


def _check_attention_family(m) -> None:
    """`model.attention`'s own checks (its family's `validate`), the backend, and the
    fields and cache policies that combine with it."""
    _check_choice("model.attention", m.attention, tuple(FAMILIES))
    _check_choice("model.attention_impl", m.attention_impl, tuple(BACKENDS))
    _check_choice("model.decode_impl", m.decode_impl, DECODE_IMPLS)
    if m.decode_impl == "cpu_kernel" and m.dtype != "float32":
        raise ConfigError(f"model.decode_impl='cpu_kernel' computes in float32 (got model.dtype="
                          f"{m.dtype!r}); use 'einsum'")
    _check_choice("model.kv_cache_dtype", m.kv_cache_dtype, CACHE_DTYPES)
    for name in ("kv_latent_dim", "q_latent_dim", "rope_head_dim", "qk_nope_dim", "sliding_window",
                 "global_every", "attention_sinks"):
        if m[name] < 0:
            raise ConfigError(f"model.{name}={m[name]} must be >= 0")
    for name in ("rope_local_theta", "attention_score_dim"):
        if m[name] < 0:
            raise ConfigError(f"model.{name}={m[name]} must be >= 0 (0: off)")
    if m.attention != "grouped":
        for name in ("qk_norm", "attention_score_dim"):
            if m[name]:
                raise ConfigError(f"model.{name}={m[name]!r} is for model.attention='grouped' only "
                                  f"(model.attention={m.attention!r}); set it to {type(m[name])(0)!r}")
    if m.attention != "latent":  # rope_head_dim: each family's own (`validate`)
        latent_only = dict(kv_latent_dim=0, q_latent_dim=0, rope_key_heads=1, rope_frequency_dim=0,
                           kv_latent_norm=True, qk_nope_dim=0, rope_pairs=[])
        for name, default in latent_only.items():
            if (list(m[name]) if name == "rope_pairs" else m[name]) != default:
                raise ConfigError(f"model.{name}={m[name]} is for model.attention='latent' only "
                                  f"(model.attention={m.attention!r}); set it to {default}")
    FAMILIES[m.attention].validate(build_model_config(m, match_mha_params=False))
    served = BACKENDS[m.attention_impl].families
    if served is not None and m.attention not in served:
        valid = [name for name, backend in BACKENDS.items()
                 if backend.families is None or m.attention in backend.families]
        raise ConfigError(f"model.attention_impl={m.attention_impl!r} is for model.attention="
                          f"{' or '.join(map(repr, served))}; model.attention={m.attention!r} "
                          f"takes {' or '.join(map(repr, valid))}")
    if m.kv_cache_dtype == "int4":
        if m.attention != "grouped" or m.sliding_window:
            raise ConfigError("model.kv_cache_dtype='int4' is for model.attention='grouped' without "
                              f"a sliding window (got attention={m.attention!r}, sliding_window="
                              f"{m.sliding_window}); use 'int8'")
        if m.kv_quant_group < 1 or m.head_dim % m.kv_quant_group or m.head_dim % 2:
            raise ConfigError(f"model.kv_quant_group={m.kv_quant_group} must divide model.head_dim="
                              f"{m.head_dim} (an even number) for model.kv_cache_dtype='int4'")
    if m.attention_sinks and not m.sliding_window:
        raise ConfigError(f"model.attention_sinks={m.attention_sinks} keeps the first positions "
                          "visible through a sliding window and needs model.sliding_window > 0")
    if m.attention_sinks and m.attention_impl not in SINK_BACKENDS:
        raise ConfigError(f"model.attention_sinks={m.attention_sinks} does not combine with "
                          f"model.attention_impl={m.attention_impl!r}; use "
                          f"{' or '.join(map(repr, SINK_BACKENDS))}")
    if m.global_every and not m.sliding_window:
        raise ConfigError(f"model.global_every={m.global_every} needs model.sliding_window > 0")
    if m.rope_local_theta and not m.sliding_window:
        raise ConfigError(f"model.rope_local_theta={m.rope_local_theta} is the RoPE base of local "
                          "layers and needs model.sliding_window > 0; or set it to 0")
    if m.rope_global_every < 0 or (m.rope_global_every and not m.rope_local_theta):
        raise ConfigError(f"model.rope_global_every={m.rope_global_every} chooses which layers take "
                          "model.rope_theta rather than model.rope_local_theta and needs "
                          "model.rope_local_theta > 0; or set it to 0")
    if m.sliding_window and m.kv_share_every != 1:
        raise ConfigError(f"model.sliding_window={m.sliding_window} does not combine with "
                          f"model.kv_share_every={m.kv_share_every}; use one of them")


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not one of: {', '.join(map(repr, valid))}")


def get_dotted(config: Any, name: str) -> Any:
    """The value of field `name` ("section.field", any depth) of a config (a ConfigDict or
    nested mappings); a ConfigError naming an unknown key with the valid ones."""
    node, parts = config, name.split(".")
    for depth, part in enumerate(parts):
        if not hasattr(node, "keys"):
            raise ConfigError(f"{name!r}: {parts[depth - 1]!r} is a value, not a section")
        if part not in node:
            raise ConfigError(_unknown_key_message(name, node))
        node = node[part]
    return node


def set_dotted(config: ml_collections.ConfigDict, name: str, value: Any) -> None:
    """Sets field `name` ("section.field", any depth) of `config` to `value`. A missing
    section or field is created, so that `validate` then names an unknown key with the
    valid ones; a ConfigError when a part of the name is a value, when the name is a
    section, or when `value`'s type is not the field's (a ConfigDict keeps each type)."""
    parent, _, field = name.rpartition(".")
    node = config
    for part in filter(None, parent.split(".")):
        if part not in node:
            node[part] = ml_collections.ConfigDict()
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"{name!r}: {part!r} is a value, not a section")
    if isinstance(node.get(field), ml_collections.ConfigDict):
        raise ConfigError(f"{name!r} is a section; name a field in it, e.g. "
                          f"{name}.{next(iter(node[field].keys()), 'FIELD')}")
    try:
        node[field] = value
    except TypeError:  # ConfigDict keeps a field's type
        raise ConfigError(f"{name}={value!r} has type {type(value).__name__}; "
                          f"expected {type(node[field]).__name__} like {node[field]!r}") from None
