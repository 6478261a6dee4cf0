"""A latent-attention model in Hugging Face's DeepSeek-V2 layout (`DeepseekV2ForCausalLM`,
every layer dense): what `python -m mqa.convert to-hf` writes for `model.attention="latent"`.

DeepSeek-V2's attention (transformers' `DeepseekV2Attention`) holds per layer:
  q_proj [h (n + r), m]          or q_a_proj [e, m], q_a_layernorm [e], q_b_proj [h (n + r), e]
  kv_a_proj_with_mqa [c + r, m]  the latent and the shared rotary key, one projection
  kv_a_layernorm [c]             the latent's RMSNorm
  kv_b_proj [h (n + d), c]       each head's key and value from the latent
  o_proj [m, h d]
with n = qk_nope_head_dim, r = qk_rope_head_dim, d = v_head_dim, c = kv_lora_rank, e =
q_lora_rank. Ours keeps the same weights apart (`mqa.attention.latent`: q and q_rope, kv_down
and k_rope, k_up and v_up). One more difference: DeepSeek rotates the rotary part's
interleaved pairs (2i, 2i + 1), ours the halves (i, i + r/2) (`mqa.rope.apply_rope`), so
the rotary columns are permuted on the way out and back on the way in (`hf-deepseek-v2`).
The rest of the layer is Llama's.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from mqa.config import ModelConfig
from mqa.convert.llama_layout import (HF_CONFIG_TAIL, LayerTable, LlamaTensors, hf_params, hf_tensors,
                                      llama_layer_tensors)
from mqa.workdir import params_by_name

# ModelConfig fields config.json states beside Llama's (num_kv_heads plays no part in MLA).
DEEPSEEK_FIELDS = ("attention", "kv_latent_dim", "q_latent_dim", "rope_head_dim", "qk_nope_dim",
                   "num_kv_heads")


def is_deepseek(config: ModelConfig) -> bool:
    """Exported as DeepSeek-V2: latent attention."""
    return config.attention == "latent"


def interleaved(rotary: np.ndarray) -> np.ndarray:
    """[..., r] in our rotate-half order (pair i = dims i, i + r/2) -> DeepSeek's interleaved
    order (pair i = dims 2i, 2i + 1)."""
    half = rotary.shape[-1] // 2
    return np.stack([rotary[..., :half], rotary[..., half:]], axis=-1).reshape(rotary.shape)


def halves(rotary: np.ndarray) -> np.ndarray:
    """The inverse of `interleaved`: DeepSeek's order -> ours."""
    return np.concatenate([rotary[..., 0::2], rotary[..., 1::2]], axis=-1)


def deepseek_config_json(config: ModelConfig) -> dict:
    """config.json of a DeepseekV2ForCausalLM computing what `config` does: every layer
    dense (first_k_dense_replace = num_layers, so no expert is built), plain RoPE, SiLU."""
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.num_layers,
        "first_k_dense_replace": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_heads,
        "kv_lora_rank": config.kv_latent_dim,
        "q_lora_rank": config.q_latent_dim or None,
        "qk_nope_head_dim": config.qk_nope_dim or config.head_dim,
        "qk_rope_head_dim": config.rope_head_dim,
        "v_head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        **HF_CONFIG_TAIL,
    }


# Ours that share one HF tensor with another of ours (DeepSeek joins them; `deepseek_tensors`).
JOINED = {"blocks.attention.q": "blocks.attention.q_rope", "blocks.attention.kv_down": "blocks.attention.k_rope",
          "blocks.attention.k_up": "blocks.attention.v_up"}


def deepseek_layer_tensors(config: ModelConfig) -> LayerTable:
    """Where each of a dense DeepSeek-V2 layer's parameters is in a Hugging Face checkpoint:
    Llama's norms and MLP, and the attention's, the pairs in `JOINED` each one part of one
    HF tensor (their rotary parts in DeepSeek's interleaved order)."""
    h, d, m = config.num_heads, config.head_dim, config.d_model
    c, e, r = config.kv_latent_dim, config.q_latent_dim, config.rope_head_dim
    n, q_in = config.qk_nope_dim or d, config.q_latent_dim or config.d_model
    queries = ("self_attn.q_b_proj.weight" if e else "self_attn.q_proj.weight", (h * (n + r), q_in))
    kv_a = ("self_attn.kv_a_proj_with_mqa.weight", (c + r, m))
    kv_b = ("self_attn.kv_b_proj.weight", (h * (n + d), c))
    per_head_q = lambda w: w.T.reshape(q_in, h, n + r)  # noqa: E731  per head: non-rotary, rotary
    per_head_kv = lambda w: w.T.reshape(c, h, n + d)    # noqa: E731  per head: key, value
    table = {name: entry for name, entry in llama_layer_tensors(config).items()
             if not name.startswith("blocks.attention.")}
    table.update({
        "blocks.attention.q": (*queries, lambda w: per_head_q(w)[..., :n]),
        "blocks.attention.q_rope": (*queries, lambda w: halves(per_head_q(w)[..., n:])),
        "blocks.attention.kv_down": (*kv_a, lambda w: w.T[:, :c]),
        "blocks.attention.k_rope": (*kv_a, lambda w: halves(w.T[:, c:])),
        "blocks.attention.kv_norm.scale": ("self_attn.kv_a_layernorm.weight", (c,), lambda w: w),
        "blocks.attention.k_up": (*kv_b, lambda w: per_head_kv(w)[..., :n]),
        "blocks.attention.v_up": (*kv_b, lambda w: per_head_kv(w)[..., n:]),
        "blocks.attention.out": ("self_attn.o_proj.weight", (m, h * d), lambda w: w.T.reshape(h, d, m)),
    })
    if e:
        table["blocks.attention.q_down"] = ("self_attn.q_a_proj.weight", (e, m), np.transpose)
        table["blocks.attention.q_norm.scale"] = ("self_attn.q_a_layernorm.weight", (e,), lambda w: w)
    return table


def hf_deepseek_params(checkpoint: LlamaTensors, config: ModelConfig) -> nnx.State:
    """A dense DeepSeek-V2's tensors (`checkpoint`, under their HF names) in mqa's layout;
    a tensor with no place in it is a ConvertError."""
    return hf_params(checkpoint, config, deepseek_layer_tensors(config), "a dense DeepSeek-V2")


def deepseek_tensors(params: nnx.State, config: ModelConfig) -> dict[str, np.ndarray]:
    """mqa's parameters -> {Hugging Face DeepSeek-V2 name: float32 array [out, in]}: the
    inverse of `hf_deepseek_params`. Each pair in `JOINED` goes out as one tensor, per head
    the first's numbers then the second's (rotary ones interleaved); the rest as Llama's."""
    table = deepseek_layer_tensors(config)
    joined = set(JOINED) | set(JOINED.values())
    tensors = hf_tensors(params, config, {k: v for k, v in table.items() if k not in joined})
    arrays = {name: np.asarray(value, np.float32) for name, value in params_by_name(params).items()}
    for first, second in JOINED.items():
        suffix, shape, _ = table[first]
        rotary = second in ("blocks.attention.q_rope", "blocks.attention.k_rope")
        for i in range(config.num_layers):
            tail = interleaved(arrays[second][i]) if rotary else arrays[second][i]
            both = np.concatenate([arrays[first][i], tail], axis=-1)   # [in, (heads,) first + second]
            tensors[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(both.reshape(shape[::-1]).T)
    return tensors
