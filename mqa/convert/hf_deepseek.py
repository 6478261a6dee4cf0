"""Hugging Face DeepSeek-V2 checkpoints with dense layers in: `python -m mqa.convert
hf-deepseek-v2 --src DIR --workdir OUT`.

Reads a local DeepseekV2ForCausalLM folder (config.json with model_type "deepseek_v2", and
*.safetensors) whose every layer is dense (`first_k_dense_replace` >= `num_hidden_layers`),
such as `to-hf` writes for latent attention, into a workdir with `model.attention="latent"`
(`mqa.convert.deepseek_layout`). Mixture-of-experts layers, the released DeepSeek-V2
models' (mqa has no experts), scaled RoPE (YaRN) and biases are one-line refusals.
"""

from __future__ import annotations

import pathlib

import ml_collections

from mqa.convert.deepseek_layout import hf_deepseek_params
from mqa.convert.errors import ConvertError
from mqa.convert.hf_llama import write_hf_workdir
from mqa.convert.llama_layout import llama_config


def hf_deepseek_config(hf: dict) -> ml_collections.ConfigDict:
    """A Hugging Face DeepseekV2Config (config.json as a dict) -> a validated experiment
    config; what mqa does not compute the same way is a ConvertError naming the field."""
    if hf.get("model_type") != "deepseek_v2":
        raise ConvertError(f"config.json model_type={hf.get('model_type')!r} is not supported by "
                           "hf-deepseek-v2; valid: 'deepseek_v2'")
    layers = _field(hf, "num_hidden_layers")
    dense = hf.get("first_k_dense_replace", 0)
    if dense < layers:
        raise ConvertError(f"config.json first_k_dense_replace={dense} < num_hidden_layers={layers}: "
                           "layers from it on are mixture-of-experts, which mqa does not have; "
                           "valid: a DeepSeek-V2 whose every layer is dense")
    for name, valid in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(name, valid) != valid:
            raise ConvertError(f"config.json {name}={hf[name]!r} is not supported; valid: {valid!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConvertError(f"config.json rope_parameters={rope!r} is not supported; valid: "
                           "rope_type 'default' (plain RoPE, no YaRN)")
    values = _field(hf, "v_head_dim")
    nope = _field(hf, "qk_nope_head_dim")
    return llama_config(dict(
        vocab_size=_field(hf, "vocab_size"),
        d_model=_field(hf, "hidden_size"),
        num_layers=layers,
        num_heads=_field(hf, "num_attention_heads"),
        num_kv_heads=_field(hf, "num_attention_heads"),
        head_dim=values,
        mlp_dim=_field(hf, "intermediate_size"),
        attention="latent",
        kv_latent_dim=_field(hf, "kv_lora_rank"),
        q_latent_dim=hf.get("q_lora_rank") or 0,
        rope_head_dim=_field(hf, "qk_rope_head_dim"),
        qk_nope_dim=0 if nope == values else nope,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
    ))


def _field(hf: dict, name: str):
    if name not in hf:
        raise ConvertError(f"config.json has no {name!r}; a DeepSeek-V2 config needs it")
    return hf[name]


def convert_hf_deepseek(src: str | pathlib.Path, workdir: str | pathlib.Path) -> str:
    """Writes the workdir for the dense HF DeepSeek-V2 checkpoint in `src`; returns a
    one-line summary (notes, if any, are printed first)."""
    src, workdir, config = write_hf_workdir(src, workdir, hf_deepseek_config, hf_deepseek_params)
    m = config.model
    return (f"converted {src} -> {workdir}: DeepSeek-V2, {m.num_layers} dense layers, d_model "
            f"{m.d_model}, {m.num_heads} query heads on a latent of {m.kv_latent_dim} + rotary key "
            f"of {m.rope_head_dim} (MLA), vocab {m.vocab_size}, "
            f"{'tied' if m.tie_embeddings else 'untied'} embeddings")
