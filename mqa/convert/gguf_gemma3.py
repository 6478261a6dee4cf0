"""Gemma 3 GGUF files (`general.architecture = gemma3`), as llama.cpp writes and reads them.

What `mqa.convert.gguf` needs beyond a Llama: the `gemma3.*` metadata -> a config, the
tensor names, and the one change llama.cpp's convert_hf_to_gguf.py makes to the weights
(Gemma3Model.norm_shift: every `*norm.weight` is written as 1 + w; q/k rows are not
permuted, since llama.cpp runs Gemma's RoPE in the rotate-half (NEOX) layout).

What the file does not say, llama.cpp's loader (llama-model.cpp, LLM_ARCH_GEMMA3) fixes,
and so does this reader: every 6th layer global, local layers with RoPE base 10,000, and
scores scaled by head_dim ** -0.5 except for the 62-layer (27B) model, which uses
(embedding_length / head_count) ** -0.5 (query_pre_attn_scalar 168). A file that states
`gemma3.rope.freq_base_swa` or `gemma3.attention.sliding_window_pattern` is read as it says.

The file is duck-typed (`mqa.convert.gguf.GgufFile`: `get`, `number`, `vocab_size`,
`tensors`) so that this module does not import the reader that dispatches to it.
"""

from __future__ import annotations

import numpy as np

from mqa.convert.errors import ConvertError
from mqa.convert.gemma_layout import gemma3_config, unit_offset

# GGUF -> Hugging Face Gemma3ForCausalLM names (per layer: blk.{i}. -> model.layers.{i}.).
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
LOCAL_THETA, PATTERN, LAYERS_27B = 10_000.0, 6, 62  # llama.cpp's fixed Gemma 3 values


def gguf_gemma3_config(file):
    """The GGUF's `gemma3.*` metadata -> a validated experiment config (`gemma3_config`)."""
    def number(key: str, default=None, kind=int):
        return file.number(f"gemma3.{key}", default, kind)

    heads, hidden, layers = (number("attention.head_count"), number("embedding_length"),
                             number("block_count"))
    head_dim = number("attention.key_length", hidden // heads)
    if number("attention.value_length", head_dim) != head_dim:
        raise ConvertError(f"gemma3.attention.value_length={number('attention.value_length')} is "
                           f"not supported; mqa needs it equal to attention.key_length={head_dim}")
    rope = number("rope.dimension_count", head_dim)
    if rope != head_dim:
        raise ConvertError(f"gemma3.rope.dimension_count={rope} is not supported; mqa applies "
                           f"RoPE to every dimension of a head ({head_dim})")
    for key, plain in (("rope.scaling.type", ("none", None)), ("rope.scaling.factor", (None, 0.0, 1.0)),
                       ("final_logit_softcapping", (None, 0.0)), ("attn_logit_softcapping", (None, 0.0))):
        value = file.get(f"gemma3.{key}")
        if value not in plain:
            raise ConvertError(f"gemma3.{key}={value!r} is not supported; valid: "
                               f"{' or '.join(repr(p) for p in plain if p is not None)} (plain RoPE, no "
                               "softcapping; Gemma 3 4B and larger scale RoPE)")
    window = number("attention.sliding_window", 0)
    every = number("attention.sliding_window_pattern", PATTERN) if window else 0
    return gemma3_config(dict(
        vocab_size=file.vocab_size(),
        d_model=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=number("attention.head_count_kv", heads),
        head_dim=head_dim,
        mlp_dim=number("feed_forward_length"),
        tie_embeddings="output.weight" not in file.tensors,
        rope_theta=number("rope.freq_base", 10_000.0, float),
        rope_local_theta=number("rope.freq_base_swa", LOCAL_THETA, float) if window else 0.0,
        sliding_window=window,
        global_every=every,
        attention_score_dim=hidden // heads if layers == LAYERS_27B else head_dim,
        norm_eps=number("attention.layer_norm_rms_epsilon", kind=float),
        max_seq_len=number("context_length"),
    ))


def restore(gguf_name: str, weight: np.ndarray) -> np.ndarray:
    """A tensor as Hugging Face's Gemma 3 holds it: norms back from 1 + w to w."""
    return unit_offset(weight) if gguf_name.endswith("norm.weight") else weight
