"""Converting a model of ours into one with a smaller KV cache, as the starting point of
uptraining or distillation: `python -m mqa.convert uptrain --src RUN --workdir OUT` with
any of

  --num_kv_heads K         fewer K/V heads (Ainslie et al. 2023): each group's heads merged by
                           --init mean (default), first, random, or aligned (rotated onto
                           each other on calibration text first, `mqa.convert.aligned`);
                           --group similarity pools the heads that attend most alike
  --kv_share_every S       K/V shared by groups of S layers (`mqa.convert.cross_layer`;
                           --init first, mean or aligned: a least-squares fit)
  --sliding_window W [--global_every N] [--attention_sinks S]
                           local layers that cache only the last W positions (every N-th
                           layer global) and the first S (StreamingLLM's sinks)
  --kv_cache_dtype int8|int4   a quantized cache
  --attention latent --kv_latent_dim C [--rope_head_dim P] [--rope_keys per_head|mixed]
                     [--rope_pairs high|contribution]
                           latent attention (MHA2MLA / TransMLA): P rotary dimensions per
                           K/V head kept (or in one key mixed from all heads; the highest
                           frequencies, or each head's pairs that contribute most), the rest of
                           the keys and the values compressed into a latent of C by PCA on
                           calibration text (`mqa.convert.latent`)

--init aligned and --attention latent read calibration text (`--text FILE`, its held-out tail left out,
`mqa.convert.calibration`). Every parameter not named above is copied unchanged; the
windows, sinks and cache dtype change the config only. Then `train.py
--config.train.init_from=OUT` uptrains it (with `train.distill_from`, towards the source).
"""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections
import numpy as np
from flax import nnx

from mqa import accounting, analysis, data, head_similarity
from mqa.convert import aligned, calibration, cross_layer, latent
from mqa.config import build_model_config, ModelConfig, validate
from mqa.convert.errors import ConvertError
from mqa.loading import load_model
from mqa.model import Transformer
from mqa.workdir import check_new_workdir, params_by_name, params_from_names, write_workdir

KV_INITS = ("mean", "first", "random", "aligned")
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
                   num_kv_heads: int, **model: object) -> ml_collections.ConfigDict:
    """The source's experiment config with `num_kv_heads` and the `model` fields given
    (None: unchanged); a widened MLP (match_mha_params) is written out as its explicit
    mlp_dim so the shapes stay the source's. One-line errors for a head count the source's
    cannot be pooled into and for fields the model cannot take (`validate`)."""
    src_kv = source.num_kv_heads
    valid = [k for k in range(1, src_kv + 1) if src_kv % k == 0]
    if num_kv_heads not in valid:
        why = ("exceeds" if num_kv_heads > src_kv else "does not divide" if num_kv_heads > 0
               else "must be >= 1 and divide")
        raise ConvertError(f"--num_kv_heads {num_kv_heads} {why} the source's model.num_kv_heads="
                           f"{src_kv}; valid: {', '.join(map(str, valid))}")
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.num_kv_heads = num_kv_heads
    config.model.update({name: value for name, value in model.items() if value is not None})
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


# how the summary names --rope_pairs' choice
PAIR_CHOICES = {"high": "the highest frequencies", "contribution": "the pairs contributing most"}


def convert_uptrain(src: str | pathlib.Path, workdir: str | pathlib.Path,
                    num_kv_heads: int | None = None, init: str = "mean", step: int | None = None,
                    group: str = "adjacent", text: str | None = None, *,
                    kv_share_every: int | None = None, sliding_window: int | None = None,
                    global_every: int | None = None, attention_sinks: int | None = None,
                    kv_cache_dtype: str | None = None, attention: str | None = None,
                    kv_latent_dim: int | None = None, rope_head_dim: int | None = None,
                    rope_keys: str = "per_head", rope_pairs: str = "high") -> str:
    """Writes the model in `src` (a workdir or checkpoint of ours; `step`: default the
    newest) converted as the module docstring says into a new workdir; returns a one-line
    summary. num_kv_heads None keeps the source's; init "aligned" reads calibration `text`.

    group: "adjacent" pools heads g*r .. g*r+r-1; "similarity" first reorders each layer's
    heads so that those with the most alike attention patterns on `text` are pooled
    together (`similarity_order`)."""
    if group not in KV_GROUPINGS:
        raise ConvertError(f"--group {group!r} is not one of: {', '.join(KV_GROUPINGS)}")
    if init not in KV_INITS:
        raise ConvertError(f"--init {init!r} is not one of: {', '.join(KV_INITS)}")
    workdir = pathlib.Path(workdir).expanduser()
    check_new_workdir(workdir)
    source = load_model(src, step=step)
    before = source.model_config
    if before.attention != "grouped":
        raise ConvertError(f"the source has model.attention={before.attention!r}; "
                           "uptrain converts model.attention='grouped' only")
    heads_asked = num_kv_heads is not None
    num_kv_heads = before.num_kv_heads if num_kv_heads is None else num_kv_heads
    sharing = kv_share_every not in (None, before.kv_share_every)
    if sharing:
        cross_layer.check_sharing(before, kv_share_every, init)
    merging = num_kv_heads != before.num_kv_heads
    latent_target = attention not in (None, "grouped")
    fields = {}
    if attention not in (None, "grouped", "latent"):
        raise ConvertError(f"--attention {attention!r}: uptrain converts to 'grouped' or 'latent'")
    if latent_target:
        if merging or sharing:
            raise ConvertError("--attention latent does not combine with --num_kv_heads or "
                               "--kv_share_every; convert in two steps")
        kv_latent_dim, rope_head_dim = latent.check(before, kv_latent_dim, rope_head_dim, rope_keys,
                                                    rope_pairs)
        fields = latent.target_fields(before, kv_latent_dim, rope_head_dim, rope_keys)
    elif (kv_latent_dim is not None or rope_head_dim is not None or rope_keys != "per_head"
          or rope_pairs != "high"):
        raise ConvertError("--kv_latent_dim, --rope_head_dim, --rope_keys and --rope_pairs are for "
                           "--attention latent")
    config = uptrain_config(source.config, before, num_kv_heads, kv_share_every=kv_share_every,
                            sliding_window=sliding_window, global_every=global_every,
                            attention_sinks=attention_sinks, kv_cache_dtype=kv_cache_dtype,
                            rope_global_every=kept_rope_bases(before, global_every), **fields)
    inputs = None
    if latent_target:
        inputs = calibration.attention_inputs(source, calibration.calibration_tokens(source, text))
        arrays, kept = latent.to_latent(params_by_name(source.params), before, inputs,
                                        kv_latent_dim, rope_head_dim, rope_keys, rope_pairs)
        if kept["pairs"] is not None:  # each key's own frequencies
            config.model.rope_pairs = [int(i) for i in kept["pairs"].reshape(-1)]
        keys = (f"as one key shared by all heads (TransMLA: the K/V heads mixed per frequency, "
                f"holding {100 * kept['rotary_mixed']:.1f}% of the kept pairs' key energy)"
                if rope_keys == "mixed" else "per K/V head")
        after = build_model_config(config.model)
        tokenizer = source.path / data.TOKENIZER_FILE
        write_workdir(workdir, config, params_from_names(after, arrays),
                      tokenizer if tokenizer.is_file() else None)
        return _summary(src, source.step, workdir, before, after, [
            f"attention grouped -> latent: {rope_head_dim} of {before.head_dim} dims stay rotary "
            f"{keys} ({PAIR_CHOICES[rope_pairs]}; {100 * kept['rotary_kept']:.1f}% of the rotary "
            f"2-norm contribution), the rest of the keys and the values in a latent of "
            f"{kv_latent_dim} ({100 * kept['latent_energy']:.1f}% of their calibration energy)",
            *_changes(before, after, init, False, False, heads=False)])
    if init == "aligned" and merging:
        aligned.check_source(before)
    if init == "aligned" and (merging or sharing):
        inputs = calibration.attention_inputs(source, calibration.calibration_tokens(source, text))
    params, grouping = source.params, ""
    size = before.num_kv_heads // num_kv_heads
    if group == "similarity":
        if before.sliding_window:
            raise ConvertError(f"--group similarity: the source has model.sliding_window="
                               f"{before.sliding_window}, which the head analysis does "
                               "not model; use --group adjacent")
        params, orders = similarity_order(source, num_kv_heads, text)
        grouping = "; groups by attention similarity, per K/V layer: " + " ".join(
            "".join(f"({','.join(map(str, order[i:i + size]))})" for i in range(0, len(order), size))
            for order in orders)
    if inputs is not None and merging:
        params = params_from_names(before, aligned.align_kv_heads(
            params_by_name(params), before, inputs, num_kv_heads))
    merged = dataclasses.replace(before, num_kv_heads=num_kv_heads)
    params = uptrain_params(params, before, num_kv_heads, init, seed=config.train.seed)
    after = build_model_config(config.model)
    if sharing:
        params = params_from_names(after, cross_layer.share_layers(
            params_by_name(params), merged, kv_share_every, init, inputs))
    tokenizer = source.path / data.TOKENIZER_FILE
    write_workdir(workdir, config, params, tokenizer if tokenizer.is_file() else None)
    return _summary(src, source.step, workdir, before, after,
                    _changes(before, after, init, merging, sharing, heads=heads_asked), grouping)


def _summary(src, step: int, workdir: pathlib.Path, before: ModelConfig, after: ModelConfig,
             changes: list[str], grouping: str = "") -> str:
    """The one-line account of a conversion: what changed, parameters and cache bytes."""
    per_token = accounting.kv_cache_bytes_per_token
    return (f"uptrained {src} (step {step}) -> {workdir}: " + "; ".join(changes) + "; "
            f"parameters {accounting.param_count(before):,} -> {accounting.param_count(after):,}; "
            f"KV cache {per_token(before):,} -> {per_token(after):,} bytes/token"
            f"{f' at {after.max_seq_len:,} tokens' if after.sliding_window else ''}{grouping}")


def kept_rope_bases(before: ModelConfig, global_every: int | None) -> int | None:
    """model.rope_global_every for a conversion that moves the global layers (None: no
    change): a source with a local RoPE base (Gemma 3) keeps each layer's base, the layers
    that were global keeping `rope_theta` whatever their new window."""
    if not before.rope_local_theta or global_every in (None, before.global_every):
        return None
    kept = before.rope_global_every or before.global_every
    if not kept:
        raise ConvertError(f"--global_every {global_every}: every layer of the source is local with "
                           f"model.rope_local_theta={before.rope_local_theta}, so the new global "
                           "layers would have no RoPE base of their own; keep --global_every 0")
    return kept


def _changes(before: ModelConfig, after: ModelConfig, init: str, merging: bool,
             sharing: bool, heads: bool = True) -> list[str]:
    """The summary's account of what changed, e.g. "K/V heads 3 -> 1 (mean-pooled in groups
    of 3)" (where --num_kv_heads was given: `heads`), "K/V shared by 2 layers (...)",
    "model.sliding_window=512"."""
    size = before.num_kv_heads // after.num_kv_heads
    how = {"mean": f"mean-pooled in groups of {size}", "first": f"first head of each group of {size}",
           "random": "re-initialised",
           "aligned": f"aligned on calibration text, then mean-pooled in groups of {size}"}[init]
    changes = [f"K/V heads {before.num_kv_heads} -> {after.num_kv_heads}" + (f" ({how})" if merging else "")
               ] if heads else []
    if sharing:
        changes.append(f"K/V shared by {after.kv_share_every} layers ({cross_layer.HOW[init]})")
    return changes + [f"model.{name}={getattr(after, name)}" for name in
                      ("sliding_window", "global_every", "attention_sinks", "kv_cache_dtype",
                       "rope_global_every")
                      if getattr(after, name) != getattr(before, name)]
