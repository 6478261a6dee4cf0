"""Hugging Face Llama checkpoints in: `python -m mqa.convert hf-llama --src DIR --workdir OUT`.

Reads a local Hugging Face Llama-architecture checkpoint (config.json and *.safetensors,
sharded or not; MHA, GQA or MQA; tied or untied embeddings) and writes a workdir that
`mqa.load_model(OUT)` and the evaluation tools read: OUT/config.json (a full experiment
config), OUT/checkpoints/0/params, and OUT/tokenizer.json when the source has one. Weights
are read with safetensors' numpy API and cast to float32, so conversion needs no torch.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

import ml_collections
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so bf16 safetensors load
import numpy as np
import safetensors
import tokenizers

from mqa import data
from mqa.config import build_model_config, ModelConfig
from mqa.convert.errors import ConvertError
from mqa.convert.llama_layout import hf_llama_params, llama_config
from mqa.workdir import check_new_workdir, write_workdir


# ----------------------------------------------------------------------------- config


def hf_llama_config(hf: dict) -> ml_collections.ConfigDict:
    """A Hugging Face LlamaConfig (config.json as a dict) -> a validated experiment config.

    Fields other than the model's keep their defaults; train.seq_len is capped at the
    model's max_seq_len.
    """
    _check_supported(hf)
    heads = _field(hf, "num_attention_heads")
    hidden = _field(hf, "hidden_size")
    head_dim = hf.get("head_dim") or hidden // heads
    if heads * head_dim != hidden:
        raise ConvertError(f"config.json head_dim={head_dim} x num_attention_heads={heads} = "
                           f"{heads * head_dim} must equal hidden_size={hidden}; mqa requires "
                           "num_heads * head_dim == d_model")
    return llama_config(dict(
        vocab_size=_field(hf, "vocab_size"),
        d_model=hidden,
        num_layers=_field(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        mlp_dim=_field(hf, "intermediate_size"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
    ))


def _check_supported(hf: dict) -> None:
    """Rejects Llama variants whose computation mqa's model does not reproduce."""
    if hf.get("model_type") != "llama":
        raise ConvertError(f"config.json model_type={hf.get('model_type')!r} is not supported; "
                           "valid: 'llama'")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ConvertError(f"config.json hidden_act={hf['hidden_act']!r} is not supported; "
                           "valid: 'silu' (SwiGLU)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise ConvertError(f"config.json {field}={hf[field]!r} is not supported; valid: false "
                               "(mqa's projections have no biases)")


def _rope_theta(hf: dict) -> float:
    """theta of plain RoPE; scaled variants (linear, dynamic, llama3, yarn, ...) are errors.

    transformers < 5 writes rope_theta and rope_scaling (null for plain RoPE); 5 and later
    write rope_parameters = {"rope_type": "default", "rope_theta": ...}.
    """
    scaling = hf.get("rope_scaling")
    if scaling is not None and not (isinstance(scaling, dict) and _rope_type(scaling) == "default"):
        raise ConvertError(f"config.json rope_scaling={scaling!r} is not supported; valid: null "
                           "(plain RoPE)")
    parameters = hf.get("rope_parameters") or {}
    if _rope_type(parameters) not in ("default", None):
        raise ConvertError(f"config.json rope_parameters={parameters!r} is not supported; valid: "
                           "rope_type 'default' (plain RoPE)")
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _rope_type(rope: dict) -> str | None:
    return rope.get("rope_type", rope.get("type"))


def _field(hf: dict, name: str):
    if name not in hf:
        raise ConvertError(f"config.json has no {name!r}; a Llama config needs it")
    return hf[name]


# ----------------------------------------------------------------------------- weights


class SafetensorsCheckpoint:
    """The tensors of model.safetensors, or of the shards model.safetensors.index.json lists
    (a `llama_layout.LlamaTensors`)."""

    def __init__(self, src: pathlib.Path):
        index = src / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: src / file for name, file in weight_map.items()}
            for file in sorted(set(self.files.values())):
                if not file.is_file():
                    raise ConvertError(f"{index} lists shard {file.name!r}, which is missing")
        else:
            self.files = {}
            for file in sorted(src.glob("*.safetensors")):
                with safetensors.safe_open(file, framework="numpy") as f:
                    self.files.update(dict.fromkeys(f.keys(), file))
        if not self.files:
            raise ConvertError(f"{str(src)!r} has no *.safetensors weights; re-save the model "
                               "with save_pretrained(..., safe_serialization=True)")

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor `name` as float32, after checking it has `shape`."""
        if name not in self.files:
            raise ConvertError(f"tensor {name!r} is missing from the checkpoint")
        with safetensors.safe_open(self.files[name], framework="numpy") as f:
            tensor = f.get_tensor(name)
        if tensor.shape != shape:
            raise ConvertError(f"tensor {name!r} has shape {tensor.shape}; config.json implies {shape}")
        return tensor.astype(np.float32)


# ----------------------------------------------------------------------------- workdir


def read_hf_config(src: pathlib.Path) -> dict:
    """A Hugging Face model directory's config.json; a ConvertError naming what is missing."""
    if not (src / "config.json").is_file():
        what = "does not exist" if not src.exists() else "has no config.json"
        raise ConvertError(f"--src {str(src)!r} {what}; give a Hugging Face model directory "
                           "with config.json and *.safetensors")
    try:
        return json.loads((src / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise ConvertError(f"{src / 'config.json'} is not valid JSON: {error}") from None


def write_hf_workdir(src: str | pathlib.Path, workdir: str | pathlib.Path,
                     read_config: Callable[[dict], ml_collections.ConfigDict],
                     read_params: Callable[[SafetensorsCheckpoint, ModelConfig], Any],
                     ) -> tuple[pathlib.Path, pathlib.Path, ml_collections.ConfigDict]:
    """What every Hugging Face reader does: config.json through `read_config` (a
    ConvertError before anything is written), the safetensors through `read_params`, then
    the workdir with the folder's tokenizer.json if it has one. Returns (src, workdir, config)."""
    src, workdir = pathlib.Path(src).expanduser(), pathlib.Path(workdir).expanduser()
    config = read_config(read_hf_config(src))
    check_new_workdir(workdir)
    model_config = build_model_config(config.model)
    params = read_params(SafetensorsCheckpoint(src), model_config)
    write_workdir(workdir, config, params, checked_tokenizer(src, model_config.vocab_size))
    return src, workdir, config


def convert_hf_llama(src: str | pathlib.Path, workdir: str | pathlib.Path) -> str:
    """Writes the workdir for the HF Llama checkpoint in `src`; returns a one-line summary
    (notes, if any, are printed first)."""
    src, workdir, config = write_hf_workdir(src, workdir, hf_llama_config, hf_llama_params)
    m = config.model
    return (f"converted {src} -> {workdir}: {m.num_layers} layers, d_model {m.d_model}, "
            f"{m.num_heads} query / {m.num_kv_heads} key-value heads, vocab {m.vocab_size}, "
            f"{'tied' if m.tie_embeddings else 'untied'} embeddings")


def checked_tokenizer(src: pathlib.Path, vocab_size: int) -> pathlib.Path | None:
    """src/tokenizer.json if it is there, after checking the tokenizers library reads it."""
    path = src / data.TOKENIZER_FILE
    if not path.is_file():
        print(f"note: {str(src)!r} has no {data.TOKENIZER_FILE}; the workdir has no tokenizer")
        return None
    try:
        tokenizer = data.BpeTokenizer(tokenizers.Tokenizer.from_file(str(path)))
    except Exception as error:  # the tokenizers library reports bad files in many ways
        raise ConvertError(f"{path} cannot be read by the tokenizers library: "
                           f"{' '.join(str(error).split())[:200]}") from None
    if tokenizer.vocab_size > vocab_size:
        print(f"note: the tokenizer has {tokenizer.vocab_size} ids but the model only "
              f"{vocab_size}; ids from {vocab_size} on have no embedding")
    return path
