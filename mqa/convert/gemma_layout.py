"""Gemma 3 (text) in mqa's terms: the config switches, the layer pattern, and where each
parameter lies in a Hugging Face Gemma3ForCausalLM checkpoint (both readers, Hugging Face
safetensors and GGUF, present their tensors under those names).

Gemma 3 is a Llama with (transformers' modeling_gemma3.py): RMSNorms that scale by
1 + weight in float32, four per layer (input_layernorm, post_attention_layernorm applied to
the attention output, pre_feedforward_layernorm, post_feedforward_layernorm applied to the
MLP output, each before its residual add), an RMSNorm over each query and key head before
RoPE (q_norm, k_norm), GeGLU with the tanh GELU, the embedding multiplied by
sqrt(hidden_size), scores scaled by query_pre_attn_scalar ** -0.5, and sliding-window
("sliding_attention") layers with a RoPE base of their own between global
("full_attention") ones.
"""

from __future__ import annotations

import ml_collections
import numpy as np
from flax import nnx

from mqa.config import ModelConfig
from mqa.convert.errors import ConvertError
from mqa.convert.llama_layout import (HF_CONFIG_TAIL, LayerTable, LlamaTensors, hf_params, llama_config,
                                      llama_layer_tensors)

# The ModelConfig switches every Gemma 3 sets (configs/default.py documents each).
GEMMA3 = dict(qk_norm=True, post_norms=True, norm_scale="one_plus_weight",
              mlp_activation="gelu_tanh", embed_scale=True)
LOCAL, GLOBAL = "sliding_attention", "full_attention"


def gemma3_config(model: dict) -> ml_collections.ConfigDict:
    """The validated experiment config of a Gemma 3 with these `model` fields (sizes,
    windows, RoPE bases, ...) and Gemma 3's switches (`llama_config`)."""
    return llama_config({**GEMMA3, **model})


def global_every(layer_types: list[str], where: str) -> int:
    """model.global_every for a list of "sliding_attention" / "full_attention" per layer:
    N when exactly layers N-1, 2N-1, ... are global, 0 when none is; a ConvertError
    (naming `where`) for a pattern mqa cannot express, or all layers global."""
    unknown = sorted(set(layer_types) - {LOCAL, GLOBAL})
    if unknown:
        raise ConvertError(f"{where} has layer type {unknown[0]!r}; valid: {LOCAL!r}, {GLOBAL!r}")
    if GLOBAL not in layer_types:
        return 0
    every = layer_types.index(GLOBAL) + 1
    expected = [GLOBAL if (i + 1) % every == 0 else LOCAL for i in range(len(layer_types))]
    if layer_types != expected or LOCAL not in layer_types:
        raise ConvertError(f"{where}={layer_types} is not supported; mqa needs every N-th layer "
                           f"global (layers N-1, 2N-1, ...) and the others local")
    return every


def gemma3_layer_tensors(config: ModelConfig) -> LayerTable:
    """Where each of a Gemma 3 layer's parameters is in a Hugging Face checkpoint: Llama's
    projections, its four norms (HF's post_attention_layernorm is the norm of the attention
    output, not the MLP's input as in a Llama) and the query/key head norms."""
    m, d = config.d_model, config.head_dim
    same = lambda w: w  # noqa: E731  norms are stored as the w in (1 + w), as ours
    table = llama_layer_tensors(config)
    table.update({
        "blocks.mlp_norm.scale": ("pre_feedforward_layernorm.weight", (m,), same),
        "blocks.attention_post_norm.scale": ("post_attention_layernorm.weight", (m,), same),
        "blocks.mlp_post_norm.scale": ("post_feedforward_layernorm.weight", (m,), same),
        "blocks.attention.q_norm.scale": ("self_attn.q_norm.weight", (d,), same),
        "blocks.attention.k_norm.scale": ("self_attn.k_norm.weight", (d,), same),
    })
    return table


def hf_gemma3_params(checkpoint: LlamaTensors, config: ModelConfig) -> nnx.State:
    """A Gemma 3 checkpoint's weights (Hugging Face names, float32 [out, in]) in mqa's
    layout, as the `nnx.State` that `nnx.split(Transformer)` gives."""
    return hf_params(checkpoint, config, gemma3_layer_tensors(config), "Gemma 3")


def unit_offset(weight: np.ndarray) -> np.ndarray:
    """A norm weight stored as 1 + w (llama.cpp's convert_hf_to_gguf.py adds the 1 to every
    Gemma norm) -> w, in float32, as transformers' GGUF loader undoes it."""
    return weight - np.float32(1)


def layers_description(m) -> str:
    """"18 layers (3 global, 15 local with a 512-token window)" for a config's model section."""
    n, window = m.num_layers, m.sliding_window
    layers = f"{n} layer{'s' if n > 1 else ''}"
    globals_ = n // m.global_every if m.global_every else 0
    if not window:
        return f"{layers}, all global"
    if not globals_:
        return f"{layers}, all local ({window}-token window)"
    return f"{layers} ({globals_} global, {n - globals_} local with a {window}-token window)"


# Fields a Gemma 3 config.json states beyond a Llama's (besides the switches in GEMMA3).
GEMMA3_FIELDS = ("sliding_window", "global_every", "rope_local_theta", "attention_score_dim")


def is_gemma3(config: ModelConfig) -> bool:
    """Whether `config` sets every one of Gemma 3's switches (`GEMMA3`)."""
    return all(getattr(config, name) == value for name, value in GEMMA3.items())


def gemma3_config_json(config: ModelConfig) -> dict:
    """config.json of a Gemma3ForCausalLM (model_type "gemma3_text") computing what `config`
    does; the inverse of `mqa.convert.hf_gemma3.hf_gemma3_config`. RoPE per layer type both
    as transformers 5 reads it (rope_parameters) and as transformers 4 did (rope_theta,
    rope_local_base_freq)."""
    layers, window = config.num_layers, config.sliding_window
    types = [GLOBAL if not window or (config.global_every and (i + 1) % config.global_every == 0)
             else LOCAL for i in range(layers)]
    local_theta = config.rope_local_theta or config.rope_theta
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {GLOBAL: {"rope_type": "default", "rope_theta": config.rope_theta},
                            LOCAL: {"rope_type": "default", "rope_theta": local_theta}},
        "rope_theta": config.rope_theta,
        "rope_local_base_freq": local_theta,
        "rope_scaling": None,
        "sliding_window": window or config.max_seq_len,  # unused when every layer is global
        "layer_types": types,
        "query_pre_attn_scalar": config.attention_score_dim or config.head_dim,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        "tie_word_embeddings": config.tie_embeddings,
        **HF_CONFIG_TAIL,
    }
