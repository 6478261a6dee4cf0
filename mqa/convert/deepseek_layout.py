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
from mqa.convert.errors import ConvertError
from mqa.convert.llama_layout import HF_CONFIG_TAIL, LlamaTensors
from mqa.workdir import params_by_name, params_from_names

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


def deepseek_tensors(params: nnx.State, config: ModelConfig) -> dict[str, np.ndarray]:
    """mqa's parameters -> {Hugging Face DeepSeek-V2 name: float32 array [out, in]}."""
    a = {name: np.asarray(value, np.float32) for name, value in params_by_name(params).items()}
    h, d, m = config.num_heads, config.head_dim, config.d_model
    e = config.q_latent_dim

    def out_in(ours: np.ndarray) -> np.ndarray:  # [in, ...] -> [out, in]
        return ours.reshape(ours.shape[0], -1).T

    tensors = {"model.embed_tokens.weight": a["embed"], "model.norm.weight": a["final_norm.scale"]}
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = a["unembed"].T
    for i in range(config.num_layers):
        layer = {name.removeprefix("blocks."): value[i] for name, value in a.items()
                 if name.startswith("blocks.")}
        prefix = f"model.layers.{i}."
        queries = out_in(np.concatenate([layer["attention.q"], interleaved(layer["attention.q_rope"])],
                                        axis=-1))                     # per head: nope, then rotary
        if e:
            tensors[prefix + "self_attn.q_a_proj.weight"] = layer["attention.q_down"].T
            tensors[prefix + "self_attn.q_a_layernorm.weight"] = layer["attention.q_norm.scale"]
            tensors[prefix + "self_attn.q_b_proj.weight"] = queries
        else:
            tensors[prefix + "self_attn.q_proj.weight"] = queries
        tensors[prefix + "self_attn.kv_a_proj_with_mqa.weight"] = np.concatenate(
            [layer["attention.kv_down"], interleaved(layer["attention.k_rope"])], axis=-1).T
        tensors[prefix + "self_attn.kv_a_layernorm.weight"] = layer["attention.kv_norm.scale"]
        tensors[prefix + "self_attn.kv_b_proj.weight"] = out_in(
            np.concatenate([layer["attention.k_up"], layer["attention.v_up"]], axis=-1))  # [c, h, n + d]
        tensors[prefix + "self_attn.o_proj.weight"] = layer["attention.out"].reshape(h * d, m).T
        tensors[prefix + "input_layernorm.weight"] = layer["attention_norm.scale"]
        tensors[prefix + "post_attention_layernorm.weight"] = layer["mlp_norm.scale"]
        tensors[prefix + "mlp.gate_proj.weight"] = layer["mlp.gate"].T
        tensors[prefix + "mlp.up_proj.weight"] = layer["mlp.up"].T
        tensors[prefix + "mlp.down_proj.weight"] = layer["mlp.down"].T
    return {name: np.ascontiguousarray(t, np.float32) for name, t in tensors.items()}


def hf_deepseek_params(checkpoint: LlamaTensors, config: ModelConfig) -> nnx.State:
    """A dense DeepSeek-V2's tensors (`checkpoint`, under their HF names) in mqa's layout:
    the inverse of `deepseek_tensors`. A tensor with no place here is a ConvertError."""
    h, d, m, f, v = config.num_heads, config.head_dim, config.d_model, config.mlp_dim, config.vocab_size
    c, e, r = config.kv_latent_dim, config.q_latent_dim, config.rope_head_dim
    n = config.qk_nope_dim or d
    attention = {  # ours -> (HF name in self_attn, its shape [out, in])
        "kv_a_proj_with_mqa": (c + r, m), "kv_a_layernorm": (c,), "kv_b_proj": (h * (n + d), c),
        "o_proj": (m, h * d),
        **({"q_a_proj": (e, m), "q_a_layernorm": (e,), "q_b_proj": (h * (n + r), e)} if e
           else {"q_proj": (h * (n + r), m)})}
    mlp = {"gate_proj": (f, m), "up_proj": (f, m), "down_proj": (m, f)}
    per_layer = {**{f"self_attn.{k}.weight": s for k, s in attention.items()},
                 **{f"mlp.{k}.weight": s for k, s in mlp.items()},
                 "input_layernorm.weight": (m,), "post_attention_layernorm.weight": (m,)}
    known = {f"model.layers.{i}.{name}" for i in range(config.num_layers) for name in per_layer}
    known |= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    unknown = sorted(name for name in checkpoint.names() - known if not name.endswith("inv_freq"))
    if unknown:
        raise ConvertError(f"tensor {unknown[0]!r} ({len(unknown)} unexpected in all) has no place "
                           "in a dense DeepSeek-V2; this converter does not handle that variant")

    layers = []
    for i in range(config.num_layers):
        w = {name: checkpoint.get(f"model.layers.{i}.{name}", shape) for name, shape in per_layer.items()}
        queries = w["self_attn.q_b_proj.weight" if e else "self_attn.q_proj.weight"].T.reshape(-1, h, n + r)
        kv_a = w["self_attn.kv_a_proj_with_mqa.weight"].T                     # [m, c + r]
        kv_b = w["self_attn.kv_b_proj.weight"].T.reshape(c, h, n + d)
        layer = {"attention.q": queries[..., :n], "attention.q_rope": halves(queries[..., n:]),
                 "attention.kv_down": kv_a[:, :c], "attention.k_rope": halves(kv_a[:, c:]),
                 "attention.kv_norm.scale": w["self_attn.kv_a_layernorm.weight"],
                 "attention.k_up": kv_b[..., :n], "attention.v_up": kv_b[..., n:],
                 "attention.out": w["self_attn.o_proj.weight"].T.reshape(h, d, m),
                 "attention_norm.scale": w["input_layernorm.weight"],
                 "mlp_norm.scale": w["post_attention_layernorm.weight"],
                 "mlp.gate": w["mlp.gate_proj.weight"].T, "mlp.up": w["mlp.up_proj.weight"].T,
                 "mlp.down": w["mlp.down_proj.weight"].T}
        if e:
            layer["attention.q_down"] = w["self_attn.q_a_proj.weight"].T
            layer["attention.q_norm.scale"] = w["self_attn.q_a_layernorm.weight"]
        layers.append(layer)
    arrays = {f"blocks.{name}": np.stack([layer[name] for layer in layers]) for name in layers[0]}
    arrays["embed"] = checkpoint.get("model.embed_tokens.weight", (v, m))
    arrays["final_norm.scale"] = checkpoint.get("model.norm.weight", (m,))
    if not config.tie_embeddings:
        arrays["unembed"] = checkpoint.get("lm_head.weight", (v, m)).T
    return params_from_names(config, arrays)
