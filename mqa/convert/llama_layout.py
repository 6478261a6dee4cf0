"""A Llama's tensors in Hugging Face's layout <-> mqa's parameters, both directions.

Hugging Face stores each projection [out, in] (y = x @ W.T) under its own name per layer
(`model.layers.{i}.self_attn.q_proj.weight`, ...). mqa's are [in, ...] with the heads split
out (q: [m, heads, d], k/v: [m, kv_heads, d], out: [heads, d, m]; mlp gate/up [m, f], down
[f, m]), each block parameter stacked along a leading [num_layers] axis, under dotted
names (`blocks.attention.q`, see `mqa.workdir.params_by_name`). Every Llama reader (HF
safetensors, GGUF) presents its tensors under the HF names; the HF writer reads them back.
"""

from __future__ import annotations

from typing import Callable, Protocol

import ml_collections
import numpy as np
from flax import nnx

from mqa.config import ModelConfig, default_config, validate
from mqa.convert.errors import ConvertError
from mqa.workdir import params_by_name, params_from_names


class LlamaTensors(Protocol):
    """A Llama checkpoint's tensors under their Hugging Face names."""

    def names(self) -> set[str]:
        """Every tensor name the checkpoint holds."""

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name` as float32 [out, in], a ConvertError unless it has `shape`."""


def llama_config(model: dict) -> ml_collections.ConfigDict:
    """The default experiment config with these `model` fields, train.seq_len capped at
    model.max_seq_len, validated (a ConfigError names a bad value)."""
    config = default_config()
    config.model.update(model)
    config.train.seq_len = min(config.train.seq_len, config.model.max_seq_len)
    return validate(config)


# The end of every config.json written out: no BOS/EOS/PAD ids (mqa does not record them),
# float32 weights.
HF_CONFIG_TAIL = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
                  "use_cache": True, "dtype": "float32"}

# ours -> (the HF tensor in model.layers.{i}, its shape [out, in], HF -> ours)
LayerTable = dict[str, tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]]


def llama_layer_tensors(config: ModelConfig) -> LayerTable:
    """Where each of a Llama layer's parameters is in a Hugging Face checkpoint."""
    m, f = config.d_model, config.mlp_dim
    h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
    return {
        "blocks.attention.q": ("self_attn.q_proj.weight", (h * d, m), lambda w: w.T.reshape(m, h, d)),
        "blocks.attention.k": ("self_attn.k_proj.weight", (kv * d, m), lambda w: w.T.reshape(m, kv, d)),
        "blocks.attention.v": ("self_attn.v_proj.weight", (kv * d, m), lambda w: w.T.reshape(m, kv, d)),
        "blocks.attention.out": ("self_attn.o_proj.weight", (m, h * d), lambda w: w.T.reshape(h, d, m)),
        "blocks.attention_norm.scale": ("input_layernorm.weight", (m,), lambda w: w),
        "blocks.mlp_norm.scale": ("post_attention_layernorm.weight", (m,), lambda w: w),
        "blocks.mlp.gate": ("mlp.gate_proj.weight", (f, m), np.transpose),
        "blocks.mlp.up": ("mlp.up_proj.weight", (f, m), np.transpose),
        "blocks.mlp.down": ("mlp.down_proj.weight", (m, f), np.transpose),
    }


def hf_llama_params(checkpoint: LlamaTensors, config: ModelConfig) -> nnx.State:
    """The HF weights in mqa's layout, as the `nnx.State` that `nnx.split(Transformer)` gives.

    HF projections are stored [out, in] (y = x @ W.T); ours are [in, ...] with heads split
    out, and each block parameter is stacked along a leading [num_layers] axis.
    """
    return hf_params(checkpoint, config, llama_layer_tensors(config), "a plain Llama")


def hf_params(checkpoint: LlamaTensors, config: ModelConfig, per_layer: LayerTable,
              architecture: str) -> nnx.State:
    """`hf_llama_params` for any layer table (Llama's, Gemma 3's): every tensor the
    checkpoint holds must have a place in it (else a ConvertError saying it has none in
    `architecture`)."""
    v, m = config.vocab_size, config.d_model
    layer_names = {f"model.layers.{i}.{suffix}" for i in range(config.num_layers)
                   for suffix, _, _ in per_layer.values()}
    known = layer_names | {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    unknown = sorted(n for n in checkpoint.names() - known if not n.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise ConvertError(f"tensor {unknown[0]!r} ({len(unknown)} unexpected in all) has no place "
                           f"in {architecture}; this converter does not handle that variant")

    arrays = {
        ours: np.stack([transform(checkpoint.get(f"model.layers.{i}.{suffix}", shape))
                        for i in range(config.num_layers)])
        for ours, (suffix, shape, transform) in per_layer.items()
    }
    arrays["embed"] = checkpoint.get("model.embed_tokens.weight", (v, m))
    arrays["final_norm.scale"] = checkpoint.get("model.norm.weight", (m,))
    if not config.tie_embeddings:  # when tied, transformers ignores a stored lm_head; so do we
        arrays["unembed"] = checkpoint.get("lm_head.weight", (v, m)).T
    return params_from_names(config, arrays)


def hf_llama_tensors(params: nnx.State, config: ModelConfig) -> dict[str, np.ndarray]:
    """mqa's parameters -> {Hugging Face Llama name: float32 array}; the inverse of
    `hf_llama_params`."""
    return hf_tensors(params, config, llama_layer_tensors(config))


def hf_tensors(params: nnx.State, config: ModelConfig, per_layer: LayerTable) -> dict[str, np.ndarray]:
    """mqa's parameters -> {Hugging Face name: float32 array} for any layer table (Llama's,
    Gemma 3's): the inverse of `hf_params`. Each of ours goes back to its HF shape [out, in]
    by the table's shapes alone (ours is [in, ...] with heads split out, so reshaping to
    [in, out] and transposing undoes every transform the tables use), layers unstacked."""
    arrays = {name: np.asarray(value, np.float32) for name, value in params_by_name(params).items()}

    def to_hf(ours: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return ours if len(shape) == 1 else ours.reshape(shape[::-1]).T

    tensors = {"model.embed_tokens.weight": arrays["embed"],
               "model.norm.weight": arrays["final_norm.scale"]}
    for i in range(config.num_layers):
        for ours, (suffix, shape, _) in per_layer.items():
            tensors[f"model.layers.{i}.{suffix}"] = to_hf(arrays[ours][i], shape)
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = arrays["unembed"].T
    return {name: np.ascontiguousarray(t, np.float32) for name, t in tensors.items()}
