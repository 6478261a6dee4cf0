"""Hugging Face Gemma 3 (text) checkpoints in: `python -m mqa.convert hf-gemma3 --src DIR --workdir OUT`.

Reads a local Gemma3ForCausalLM folder (config.json with model_type "gemma3_text", and
*.safetensors) into the same workdir as `hf-llama` writes (`mqa.convert.hf_llama`), with
Gemma 3's switches set (`mqa.convert.gemma_layout`). Both config.json layouts are read:
transformers 5's `rope_parameters` per layer type, and transformers 4's `rope_theta` (global
layers) with `rope_local_base_freq` (local layers).
"""

from __future__ import annotations

import pathlib

import ml_collections

from mqa.convert.errors import ConvertError
from mqa.convert.gemma_layout import (GLOBAL, LOCAL, gemma3_config, global_every, hf_gemma3_params,
                                      layers_description)
from mqa.convert.hf_llama import write_hf_workdir

# transformers' Gemma3TextConfig defaults, for fields a config.json may leave out.
DEFAULT_LOCAL_THETA, DEFAULT_GLOBAL_THETA, DEFAULT_PATTERN = 10_000.0, 1_000_000.0, 6


def hf_gemma3_config(hf: dict) -> ml_collections.ConfigDict:
    """A Hugging Face Gemma3TextConfig (config.json as a dict) -> a validated experiment
    config; what mqa does not compute the same way is a ConvertError naming the field."""
    if hf.get("model_type") != "gemma3_text":
        raise ConvertError(f"config.json model_type={hf.get('model_type')!r} is not supported by "
                           "hf-gemma3; valid: 'gemma3_text' (Gemma3ForCausalLM; the multimodal "
                           "'gemma3' is not)")
    for name, valid in (("hidden_activation", "gelu_pytorch_tanh"), ("attention_bias", False),
                        ("final_logit_softcapping", None), ("attn_logit_softcapping", None),
                        ("use_bidirectional_attention", False)):
        value = hf.get(name, valid)
        if value != valid and not (valid is False and value is None):
            raise ConvertError(f"config.json {name}={value!r} is not supported; valid: {valid!r}")
    layers, heads = _field(hf, "num_hidden_layers"), _field(hf, "num_attention_heads")
    types = hf.get("layer_types") or [
        GLOBAL if (i + 1) % hf.get("sliding_window_pattern", DEFAULT_PATTERN) == 0 else LOCAL
        for i in range(layers)]
    if len(types) != layers:
        raise ConvertError(f"config.json layer_types has {len(types)} entries for "
                           f"num_hidden_layers={layers}")
    every = global_every(types, "config.json layer_types") if LOCAL in types else 0
    window = (hf.get("sliding_window") or 0) if LOCAL in types else 0
    if LOCAL in types and window < 1:
        raise ConvertError(f"config.json sliding_window={hf.get('sliding_window')!r} must be >= 1 "
                           "for the sliding_attention layers")
    global_theta, local_theta = _rope_thetas(hf)
    head_dim = hf.get("head_dim") or _field(hf, "hidden_size") // heads
    return gemma3_config(dict(
        vocab_size=_field(hf, "vocab_size"),
        d_model=_field(hf, "hidden_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        mlp_dim=_field(hf, "intermediate_size"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        rope_theta=global_theta,
        rope_local_theta=local_theta if window else 0.0,
        sliding_window=window,
        global_every=every,
        attention_score_dim=int(hf.get("query_pre_attn_scalar") or head_dim),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 131_072),
    ))


def _rope_thetas(hf: dict) -> tuple[float, float]:
    """(global layers' RoPE base, local layers'); scaled RoPE is a ConvertError."""
    if hf.get("rope_scaling") is not None:
        raise ConvertError(f"config.json rope_scaling={hf['rope_scaling']!r} is not supported; "
                           "valid: null (plain RoPE; Gemma 3 4B and larger scale it)")
    parameters = hf.get("rope_parameters") or {}
    thetas = []
    for kind, old_key, default in ((GLOBAL, "rope_theta", DEFAULT_GLOBAL_THETA),
                                   (LOCAL, "rope_local_base_freq", DEFAULT_LOCAL_THETA)):
        rope = parameters.get(kind) or {}
        if rope.get("rope_type", "default") != "default":
            raise ConvertError(f"config.json rope_parameters[{kind!r}]={rope!r} is not supported; "
                               "valid: rope_type 'default' (plain RoPE)")
        thetas.append(float(rope.get("rope_theta", hf.get(old_key, default))))
    return thetas[0], thetas[1]


def _field(hf: dict, name: str):
    if name not in hf:
        raise ConvertError(f"config.json has no {name!r}; a Gemma 3 config needs it")
    return hf[name]


def convert_hf_gemma3(src: str | pathlib.Path, workdir: str | pathlib.Path) -> str:
    """Writes the workdir for the HF Gemma 3 checkpoint in `src`; returns a one-line summary
    (notes, if any, are printed first)."""
    src, workdir, config = write_hf_workdir(src, workdir, hf_gemma3_config, hf_gemma3_params)
    return summary(src, workdir, config.model)


def summary(src, workdir, m) -> str:
    """The one line about a converted Gemma 3 (`m`: its config's model section)."""
    return (f"converted {src} -> {workdir}: Gemma 3, {layers_description(m)}, d_model {m.d_model}, "
            f"{m.num_heads} query / {m.num_kv_heads} key-value heads of {m.head_dim}, vocab "
            f"{m.vocab_size}, {'tied' if m.tie_embeddings else 'untied'} embeddings")
