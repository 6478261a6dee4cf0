"""Uptraining's starting point: `python -m mqa.convert uptrain --src RUN --num_kv_heads K
--workdir OUT [--init mean|first|random] [--group adjacent|similarity]`.

Turns a workdir of ours (MHA or GQA) into one with K key/value heads, as the starting point
of uptraining (Ainslie et al. 2023): `train.py --config.train.init_from=OUT`. The heads
pooled together are adjacent ones, or (`--group similarity`) those whose attention
patterns are most alike (`mqa.head_similarity`). Every other parameter is copied unchanged.
"""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections
import numpy as np
from flax import nnx

from mqa import accounting, analysis, data, head_similarity
from mqa.config import build_model_config, ModelConfig, validate
from mqa.convert.errors import ConvertError
from mqa.loading import load_model
from mqa.model import Transformer
from mqa.workdir import check_new_workdir, params_by_name, params_from_names, write_workdir

KV_INITS = ("mean", "first", "random")
KV_GROUPINGS = ("adjacent", "similarity")
KV_PROJECTIONS = ("blocks.attention.k", "blocks.attention.v")


def pool_kv_heads(kernel: np.ndarray, num_kv_heads: int, init: str) -> np.ndarray:
    """K or V projections [..., src_kv_heads, head_dim] -> [..., num_kv_heads, head_dim].

    Group g holds source heads g*r ... g*r+r-1 (r = src_kv_heads / num_kv_heads), the query
    heads of which all read new head g; `init` "mean" averages them (in float64), "first"
    keeps head g*r.
    """
    *lead, heads, head_dim = kernel.shape
    groups = kernel.reshape(*lead, num_kv_heads, heads // num_kv_heads, head_dim)
    if init == "first":
        return groups[..., 0, :]
    return groups.astype(np.float64).mean(axis=-2).astype(kernel.dtype)


def uptrain_params(params: nnx.State, source: ModelConfig, num_kv_heads: int, init: str,
                   seed: int = 0) -> nnx.State:
    """The source model's parameters with K/V projections [layers, m, src_kv_heads, d]
    turned into [layers, m, num_kv_heads, d] (with cross-layer KV sharing: the `blocks`
    that own K/V, [num_kv_layers, ...]); every other parameter is copied unchanged.

    init: "mean" or "first" (see `pool_kv_heads`), or "random": K and V as a fresh
    Transformer with the new shapes initialises them (`nnx.Rngs(seed)`).
    """
    target = dataclasses.replace(source, num_kv_heads=num_kv_heads)
    arrays = params_by_name(params)
    if init == "random":
        fresh = params_by_name(nnx.split(Transformer(target, rngs=nnx.Rngs(seed)))[1])
        arrays.update({name: fresh[name] for name in KV_PROJECTIONS})
    else:
        arrays.update({name: pool_kv_heads(arrays[name], num_kv_heads, init)
                       for name in KV_PROJECTIONS})
    return params_from_names(target, arrays)


def uptrain_config(config: ml_collections.ConfigDict, source: ModelConfig,
                   num_kv_heads: int) -> ml_collections.ConfigDict:
    """The source's experiment config with `num_kv_heads`; a widened MLP
    (match_mha_params) is written out as its explicit mlp_dim so the shapes stay the source's."""
    src_kv = source.num_kv_heads
    valid = [k for k in range(1, src_kv + 1) if src_kv % k == 0]
    if num_kv_heads not in valid:
        why = ("exceeds" if num_kv_heads > src_kv else "does not divide" if num_kv_heads > 0
               else "must be >= 1 and divide")
        raise ConvertError(f"--num_kv_heads {num_kv_heads} {why} the source's model.num_kv_heads="
                           f"{src_kv}; valid: {', '.join(map(str, valid))}")
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.num_kv_heads = num_kv_heads
    if config.model.match_mha_params:
        config.model.update(mlp_dim=source.mlp_dim, match_mha_params=False)
    return validate(config)


def similarity_order(source, num_kv_heads: int, text: str | None) -> tuple[nnx.State, list[list[int]]]:
    """The source's parameters with each K/V layer's heads reordered so that the heads whose
    attention patterns are most alike (on `text`, default the run's held-out split) sit in
    the same group of the pooling (`head_similarity`); the function is unchanged. Returns
    (parameters, per K/V layer the new order of its heads)."""
    seq_len = min(source.config.train.seq_len, 256)
    tokens = analysis.analysis_tokens(source, text, windows=8, seq_len=seq_len)
    layers = head_similarity.analyse(source.module(), tokens)
    orders = head_similarity.kv_group_orders(layers, source.model_config, num_kv_heads)
    arrays = head_similarity.permute_heads(params_by_name(source.params), source.model_config, orders)
    return params_from_names(source.model_config, arrays), orders


def convert_uptrain(src: str | pathlib.Path, workdir: str | pathlib.Path, num_kv_heads: int,
                    init: str = "mean", step: int | None = None, group: str = "adjacent",
                    text: str | None = None) -> str:
    """Writes the model in `src` (a workdir or checkpoint of ours; `step`: default the
    newest) with `num_kv_heads` K/V heads as a new workdir; returns a one-line summary.

    group: "adjacent" pools heads g*r .. g*r+r-1; "similarity" first reorders each layer's
    heads so that those with the most alike attention patterns on `text` are pooled
    together (`similarity_order`)."""
    if group not in KV_GROUPINGS:
        raise ConvertError(f"--group {group!r} is not one of: {', '.join(KV_GROUPINGS)}")
    workdir = pathlib.Path(workdir).expanduser()
    check_new_workdir(workdir)
    source = load_model(src, step=step)
    if source.model_config.attention != "grouped":
        raise ConvertError(f"the source has model.attention={source.model_config.attention!r}; "
                           "uptrain pools the K/V heads of model.attention='grouped' only")
    config = uptrain_config(source.config, source.model_config, num_kv_heads)
    params, grouping = source.params, ""
    size = source.model_config.num_kv_heads // num_kv_heads
    if group == "similarity":
        if source.model_config.sliding_window:
            raise ConvertError(f"--group similarity: the source has model.sliding_window="
                               f"{source.model_config.sliding_window}, which the head analysis does "
                               "not model; use --group adjacent")
        params, orders = similarity_order(source, num_kv_heads, text)
        grouping = "; groups by attention similarity, per K/V layer: " + " ".join(
            "".join(f"({','.join(map(str, order[i:i + size]))})" for i in range(0, len(order), size))
            for order in orders)
    params = uptrain_params(params, source.model_config, num_kv_heads, init,
                            seed=config.train.seed)
    tokenizer = source.path / data.TOKENIZER_FILE
    write_workdir(workdir, config, params, tokenizer if tokenizer.is_file() else None)

    before, after = source.model_config, build_model_config(config.model)
    how = {"mean": f"mean-pooled in groups of {size}", "first": f"first head of each group of {size}",
           "random": "re-initialised"}[init]
    return (f"uptrained {src} (step {source.step}) -> {workdir}: K/V heads {before.num_kv_heads} -> "
            f"{num_kv_heads} ({how}); parameters {accounting.param_count(before):,} -> "
            f"{accounting.param_count(after):,}; KV cache {accounting.kv_cache_bytes_per_token(before):,}"
            f" -> {accounting.kv_cache_bytes_per_token(after):,} bytes/token{grouping}")
