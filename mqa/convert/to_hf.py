"""Hugging Face Llama, Gemma 3 and DeepSeek-V2 folders out: `python -m mqa.convert to-hf --src WORKDIR --workdir DIR [--step N]`.

Writes DIR/config.json (a LlamaConfig; a Gemma3TextConfig for a model with Gemma 3's
switches, `mqa.convert.gemma_layout.GEMMA3`; a DeepseekV2Config, every layer dense, for
latent attention, `mqa.convert.deepseek_layout`), DIR/model.safetensors (float32, written with
safetensors' numpy API, so no torch is needed) and, when the workdir's tokenizer is a
`tokenizers` one (BPE, or one that came with a converted model), DIR/tokenizer.json and
DIR/tokenizer_config.json, so that `LlamaForCausalLM.from_pretrained(DIR)` (or
`Gemma3ForCausalLM`, `DeepseekV2ForCausalLM`) and `AutoTokenizer.from_pretrained(DIR)` work. The inverse of
`hf-llama` and `hf-gemma3`: the tensors of a checkpoint converted with them come back bit
for bit.

Any model the Llama architecture can express is exported: MHA, GQA or MQA, tied or untied
embeddings; and DeepSeek's latent attention (MLA, with or without low-rank queries). One
none of them can (cross-layer KV sharing, `model.kv_share_every` > 1, a converted latent
model's per-head rotary keys, or any other field that changes the computation away from its
default) is a one-line ConvertError naming the field.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import safetensors.numpy

from mqa import data
from mqa.config import ModelConfig, build_model_config
from mqa.convert.deepseek_layout import DEEPSEEK_FIELDS, deepseek_config_json, deepseek_tensors, is_deepseek
from mqa.convert.errors import ConvertError
from mqa.convert.gemma_layout import (GEMMA3, GEMMA3_FIELDS, gemma3_config_json, gemma3_layer_tensors,
                                      is_gemma3)
from mqa.convert.llama_layout import HF_CONFIG_TAIL, hf_llama_tensors, hf_tensors
from mqa.loading import load_model
from mqa.workdir import check_new_workdir

# ModelConfig fields that config.json states.
LLAMA_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "mlp_dim", "tie_embeddings", "rope_theta", "norm_eps", "max_seq_len")
# Fields that choose how mqa computes, not what: the exported model is the same without them.
HOW_FIELDS = ("attention_impl", "attention_block", "dtype", "remat", "scan_unroll", "kv_cache_dtype",
              "decode_impl")


def check_expressible(config: ModelConfig) -> None:
    """A ConvertError naming the first field the architecture it exports as (Gemma 3 when
    every Gemma 3 switch is set, DeepSeek-V2 for latent attention, else Llama) cannot
    express: every field that is neither in its config.json nor a matter of how mqa computes
    must keep its default in configs/default.py (so a field added later is refused until
    this module knows it)."""
    defaults = build_model_config()  # configs/default.py's values, as a ModelConfig holds them
    gemma, deepseek = is_gemma3(config), is_deepseek(config)
    stated = LLAMA_FIELDS + HOW_FIELDS + ((*GEMMA3, *GEMMA3_FIELDS) if gemma else ()) + (
        DEEPSEEK_FIELDS if deepseek else ())
    architecture = "Gemma 3" if gemma else "DeepSeek-V2" if deepseek else "Llama"
    if deepseek and config.d_model % config.num_heads:
        raise ConvertError(f"model.d_model={config.d_model} is not a multiple of model.num_heads="
                           f"{config.num_heads}, which a Hugging Face DeepSeek-V2 config requires")
    for name in ModelConfig.field_names():
        if name in stated:
            continue
        value = getattr(config, name)
        if value != getattr(defaults, name):
            what = (" (cross-layer KV sharing)" if name == "kv_share_every" else "")
            raise ConvertError(f"model.{name}={value!r}{what} cannot be expressed as a "
                               f"Hugging Face {architecture}; valid: {getattr(defaults, name)!r}")


def hf_config_json(config: ModelConfig) -> dict:
    """config.json of a LlamaForCausalLM computing what `config` does (plain RoPE, SiLU,
    no biases). RoPE is written both as transformers 5 reads it (rope_parameters) and as
    transformers 4 did (rope_theta); no BOS/EOS ids, which mqa does not record."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        **HF_CONFIG_TAIL,
    }


def export_hf(src: str | pathlib.Path, out: str | pathlib.Path, step: int | None = None) -> str:
    """Writes the model in `src` (a workdir or checkpoint of ours; `step`: default the
    newest) as a Hugging Face Llama, Gemma 3 or DeepSeek-V2 folder `out`; returns a one-line summary (a note on the
    tokenizer, if any, is printed first)."""
    out = pathlib.Path(out).expanduser()
    check_new_workdir(out)
    source = load_model(src, step=step)
    config = source.model_config
    check_expressible(config)
    gemma, deepseek = is_gemma3(config), is_deepseek(config)
    tensors = (hf_tensors(source.params, config, gemma3_layer_tensors(config)) if gemma
               else deepseek_tensors(source.params, config) if deepseek
               else hf_llama_tensors(source.params, config))

    out.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", data.file_mode())  # readable like any new file
    tokenizer_note = _write_tokenizer(source, out)
    if tokenizer_note.startswith("note:"):
        print(tokenizer_note)
    hf_config = (gemma3_config_json(config) if gemma else deepseek_config_json(config) if deepseek
                 else hf_config_json(config))
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    kind = ("MHA" if config.num_kv_heads == config.num_heads else
            "MQA" if config.num_kv_heads == 1 else "GQA")
    heads = (f"{config.num_heads} query heads on a latent of {config.kv_latent_dim} + rotary key of "
             f"{config.rope_head_dim} (MLA)" if deepseek else
             f"{config.num_heads} query / {config.num_kv_heads} key-value heads ({kind})")
    return (f"exported {source.path} (step {source.step}) -> {out}: {hf_config['architectures'][0]}, "
            f"{config.num_layers} layers, {heads}, {'tied' if config.tie_embeddings else 'untied'} "
            f"embeddings, {len(tensors)} tensors in model.safetensors"
            f"{'' if tokenizer_note.startswith('note:') else '; ' + tokenizer_note}")


def _write_tokenizer(source, out: pathlib.Path) -> str:
    """Copies a `tokenizers` tokenizer.json and writes tokenizer_config.json; returns what
    was done, or a note why not."""
    if source.tokenizer is None:
        return (f"note: {str(source.path)!r} has no {data.TOKENIZER_FILE}; no tokenizer files "
                "written")
    if not isinstance(source.tokenizer, data.BpeTokenizer):
        return (f"note: the workdir's tokenizer is mqa's {source.tokenizer.name!r} tokenizer "
                "(token id = UTF-8 byte), which transformers cannot load; no tokenizer files "
                "written (encode text as its UTF-8 bytes)")
    shutil.copyfile(source.path / data.TOKENIZER_FILE, out / data.TOKENIZER_FILE)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": source.model_config.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    return "tokenizer.json + tokenizer_config.json"
