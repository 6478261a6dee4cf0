"""llama.cpp GGUF files of a Llama or a Gemma 3 in: `python -m mqa.convert gguf --src FILE.gguf --workdir OUT`.

`general.architecture` says which: "llama" is read here, "gemma3" by `mqa.convert.gguf_gemma3`
through the same reader and checkpoint. A Llama's hyperparameters come from the `llama.*`
metadata, the tokenizer from `tokenizer.ggml.*` (see `mqa.convert.gguf_tokenizer`), and the tensors (F32, F16, BF16 or any quantized type the
`gguf` package can dequantize: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants, ...) are
dequantized to float32 by `gguf.quants.dequantize`, the same code transformers' GGUF
loader uses, so both read the same weights. No torch is needed.

Two llama.cpp conventions are undone: a GGUF tensor's shape is listed innermost dimension
first (the reader's `data` has the numpy shape, [rows, columns] as in Hugging Face's
[out, in]); and llama.cpp's convert_hf_to_gguf.py permutes the rows of q_proj and k_proj
within each head from Hugging Face's rotate-half layout to interleaved pairs
(`LlamaModel.permute`), which `unpermute_rows` inverts (a Gemma 3's rows are not
permuted; its norms are stored as 1 + w instead, see `gguf_gemma3`).
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import time
from typing import Callable

import numpy as np

from mqa import data
from mqa.config import build_model_config, ModelConfig
from mqa.convert.errors import ConvertError
from mqa.convert import gguf_gemma3
from mqa.convert.gemma_layout import hf_gemma3_params, layers_description
from mqa.convert.gguf_tokenizer import gguf_tokenizer
from mqa.convert.llama_layout import hf_llama_params, llama_config
from mqa.workdir import check_new_workdir, write_workdir

try:  # an ordinary requirement (requirements.txt); imported here so hf-llama works without it
    import gguf
    from gguf import GGMLQuantizationType, GGUFValueType
except ImportError:  # pragma: no cover
    gguf = None

# GGUF tensor names -> Hugging Face Llama names (per layer: blk.{i}. -> model.layers.{i}.).
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverts llama.cpp's LlamaModel.permute of a q_proj/k_proj weight [n_head * head_dim, in]:
    its rows per head are (pair j, member s) interleaved; ours are (s, j), rotate-half.
    Same as transformers' LlamaTensorProcessor._reverse_permute_weights."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# ----------------------------------------------------------------------------- reading


class GgufFile:
    """A GGUF file's metadata {key: python value} and tensors {name: gguf ReaderTensor}."""

    def __init__(self, path: pathlib.Path):
        if gguf is None:
            raise ConvertError("reading GGUF files needs the gguf package: pip install 'gguf>=0.13'")
        if not path.is_file():
            raise ConvertError(f"--src {str(path)!r} " + ("is not a file" if path.exists() else
                                                           "does not exist") + "; give a .gguf file")
        try:
            reader = gguf.GGUFReader(path)
        except Exception as error:  # the reader reports a bad file in many ways
            with path.open("rb") as f:
                magic = f.read(4) == b"GGUF"
            message = " ".join(str(error).split())
            if "is not a valid GGMLQuantizationType" in message:  # a type id newer than gguf's
                kind = message.split(" is not")[0].removeprefix("np.uint32(").removesuffix(")")
                raise ConvertError(f"{str(path)!r} has a tensor of GGML type {kind}, which gguf "
                                   f"{_gguf_version()} does not know; supported: "
                                   f"{', '.join(supported_types())}") from None
            what = (f"is a GGUF file that cannot be read, truncated or damaged "
                    f"({path.stat().st_size:,} bytes)" if magic else "cannot be read as a GGUF file")
            raise ConvertError(f"{str(path)!r} {what}: {message[:200]}") from None
        self.path = path
        self.metadata = {key: _field_value(field) for key, field in reader.fields.items()
                         if not key.startswith("GGUF.")}
        self.tensors = {tensor.name: tensor for tensor in reader.tensors}

    def get(self, key: str, default=None, *, required: bool = False):
        if key not in self.metadata:
            if required:
                arch = self.metadata.get("general.architecture", "model")
                raise ConvertError(f"the GGUF metadata has no {key!r}; a {arch} file needs it")
            return default
        return self.metadata[key]

    def number(self, key: str, default=None, kind=int):
        """Metadata `key` as `kind` (required when default is None); a per-layer list (one
        value per layer) is a ConvertError."""
        value = self.get(key, default, required=default is None)
        if isinstance(value, list):
            raise ConvertError(f"{key} is a per-layer list {value[:4]}...; mqa needs one value "
                               "for every layer")
        return kind(value)

    def vocab_size(self) -> int:
        """The vocabulary's size: tokenizer.ggml.tokens' (or token_embd.weight's rows), after
        checking the two agree."""
        embed = self.tensors.get("token_embd.weight")
        if embed is None:
            raise ConvertError("tensor 'token_embd.weight' is missing from the GGUF file")
        rows = int(embed.shape[-1])  # ggml lists the innermost dimension first: [d_model, vocab]
        tokens = self.get("tokenizer.ggml.tokens")
        vocab_size = len(tokens) if tokens is not None else rows
        if vocab_size != rows:
            raise ConvertError(f"tokenizer.ggml.tokens has {vocab_size} tokens but token_embd.weight "
                               f"has {rows} rows")
        return vocab_size


def _field_value(field):
    """A ReaderField's value: str, int, float, bool, or a list of them (arrays).

    Parsed from `parts`/`data`/`types`, which every gguf release since 0.10 has
    (`ReaderField.contents()` is newer)."""
    types = list(field.types)
    if types and types[0] == GGUFValueType.ARRAY:
        if len(types) != 2:
            return None  # nested arrays: no Llama field is one
        return [_scalar(field.parts[i], types[1]) for i in field.data]
    return _scalar(field.parts[field.data[0]], types[0]) if field.data else None


def _scalar(part, kind):
    if kind == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    if kind == GGUFValueType.BOOL:
        return bool(part[0])
    if kind in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        return float(part[0])
    return int(part[0])


# ----------------------------------------------------------------------------- config


ARCHITECTURES = ("llama", "gemma3")


def architecture(file: GgufFile) -> str:
    """general.architecture, one this converter reads (else a ConvertError)."""
    arch = file.get("general.architecture", required=True)
    if arch not in ARCHITECTURES:
        raise ConvertError(f"general.architecture={arch!r} is not supported; valid: "
                           f"{', '.join(map(repr, ARCHITECTURES))}")
    return arch


def gguf_llama_config(file: GgufFile):
    """The GGUF's `llama.*` metadata -> a validated experiment config (see `llama_config`)."""
    def number(key: str, default=None, kind=int):
        return file.number(f"llama.{key}", default, kind)

    heads, hidden = number("attention.head_count"), number("embedding_length")
    if hidden % heads:
        raise ConvertError(f"llama.embedding_length={hidden} is not a multiple of "
                           f"llama.attention.head_count={heads}")
    head_dim = hidden // heads
    for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        value = file.get(f"llama.{key}")
        if value is not None and value != head_dim:
            raise ConvertError(f"llama.{key}={value} is not supported; mqa needs embedding_length / "
                               f"head_count = {head_dim} (full-width heads, RoPE on every dimension)")
    _check_plain_rope(file)
    if number("expert_count", 0):
        raise ConvertError(f"llama.expert_count={number('expert_count')} is not supported: mqa "
                           "has no mixture-of-experts layers")

    return llama_config(dict(
        vocab_size=file.vocab_size(),
        d_model=hidden,
        num_layers=number("block_count"),
        num_heads=heads,
        num_kv_heads=number("attention.head_count_kv", heads),
        head_dim=head_dim,
        mlp_dim=number("feed_forward_length"),
        tie_embeddings="output.weight" not in file.tensors,
        rope_theta=number("rope.freq_base", 10000.0, float),  # llama.cpp's default
        norm_eps=number("attention.layer_norm_rms_epsilon", kind=float),
        max_seq_len=number("context_length"),
    ))


def _check_plain_rope(file: GgufFile) -> None:
    scaling = file.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ConvertError(f"llama.rope.scaling.type={scaling!r} is not supported; valid: none "
                           "(plain RoPE)")
    factor = file.get("llama.rope.scaling.factor")
    if factor not in (None, 0.0, 1.0):
        raise ConvertError(f"llama.rope.scaling.factor={factor} is not supported; valid: 1 "
                           "(plain RoPE)")
    if "rope_freqs.weight" in file.tensors:
        raise ConvertError("tensor 'rope_freqs.weight' (Llama 3.1-style RoPE scaling) is not "
                           "supported; mqa implements plain RoPE")


# ----------------------------------------------------------------------------- weights


class GgufCheckpoint:
    """The GGUF's tensors under their Hugging Face names (a `llama_layout.LlamaTensors`):
    `get` dequantizes to float32 [out, in] and undoes what llama.cpp changed on the way in:
    a Llama's q_proj/k_proj rows are un-permuted; a Gemma 3's norms had 1 added
    (`gemma_layout.unit_offset`). `layer_tensors`, `global_tensors`: GGUF name -> HF name
    (per layer without the blk.{i}./model.layers.{i}. prefix); `architecture` names the
    model in the error for a tensor it has no place for; `restore(gguf_name, weight)` undoes
    llama.cpp's changes (default: a Llama's, `unpermute`)."""

    def __init__(self, file: GgufFile, config: ModelConfig, layer_tensors: dict | None = None,
                 global_tensors: dict | None = None, architecture: str = "a plain Llama",
                 restore: Callable[[str, np.ndarray], np.ndarray] | None = None):
        self.file, self.config = file, config
        self.restore = restore or self.unpermute
        self.gguf_names = dict(GLOBAL_TENSORS if global_tensors is None else global_tensors)
        for i in range(config.num_layers):
            self.gguf_names.update({f"blk.{i}.{g}": f"model.layers.{i}.{h}" for g, h in
                                    (LAYER_TENSORS if layer_tensors is None else layer_tensors).items()})
        unknown = sorted(set(file.tensors) - set(self.gguf_names))
        if unknown:
            raise ConvertError(f"tensor {unknown[0]!r} ({len(unknown)} unexpected in all) has no "
                               f"place in {architecture}; this converter does not handle that variant")
        self.hf_names = {hf: name for name, hf in self.gguf_names.items()}
        for tensor in file.tensors.values():
            _check_dequantizable(tensor)

    def names(self) -> set[str]:
        return {self.gguf_names[name] for name in self.file.tensors}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        gguf_name = self.hf_names[name]
        tensor = self.file.tensors.get(gguf_name)
        if tensor is None:
            raise ConvertError(f"tensor {gguf_name!r} is missing from the GGUF file")
        stored = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # numpy order
        if stored != shape:
            raise ConvertError(f"tensor {gguf_name!r} has shape {stored} (rows, columns); the "
                               f"metadata implies {shape}")
        weight = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        return self.restore(gguf_name, weight.reshape(shape))

    def unpermute(self, gguf_name: str, weight: np.ndarray) -> np.ndarray:
        """A Llama's q_proj/k_proj [out, in] with llama.cpp's row permutation undone."""
        if gguf_name.endswith("attn_q.weight"):
            weight = unpermute_rows(weight, self.config.num_heads)
        elif gguf_name.endswith("attn_k.weight"):
            weight = unpermute_rows(weight, self.config.num_kv_heads)
        return weight


_DEQUANTIZABLE: dict = {}


def dequantizable(kind) -> bool:
    """Whether gguf.quants.dequantize handles GGML type `kind`, tried once per type on one
    zero block; an integer type (I8, I32, ...) or one newer than the gguf package is not."""
    if kind not in _DEQUANTIZABLE:
        try:
            block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
            out = gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), kind)
            _DEQUANTIZABLE[kind] = out.dtype.kind == "f" and out.size == block_size
        except Exception:
            _DEQUANTIZABLE[kind] = False
    return _DEQUANTIZABLE[kind]


def supported_types() -> list[str]:
    """The GGML types the installed gguf package dequantizes."""
    return [kind.name for kind in GGMLQuantizationType if dequantizable(kind)]


def _check_dequantizable(tensor) -> None:
    if not dequantizable(tensor.tensor_type):
        raise ConvertError(f"tensor {tensor.name!r} has type {_type_name(tensor.tensor_type)}, "
                           f"which gguf {_gguf_version()} cannot dequantize; supported: "
                           f"{', '.join(supported_types())}")


def _gguf_version() -> str:
    try:
        return importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def _type_name(kind) -> str:
    return getattr(kind, "name", str(kind))


# ----------------------------------------------------------------------------- workdir


def convert_gguf(src: str | pathlib.Path, workdir: str | pathlib.Path) -> str:
    """Writes the workdir for the Llama or Gemma 3 GGUF file `src`; returns a one-line
    summary (notes, if any, are printed first)."""
    start = time.perf_counter()
    src, workdir = pathlib.Path(src).expanduser(), pathlib.Path(workdir).expanduser()
    file = GgufFile(src)
    gemma = architecture(file) == "gemma3"
    config = gguf_gemma3.gguf_gemma3_config(file) if gemma else gguf_llama_config(file)
    check_new_workdir(workdir)
    model_config = build_model_config(config.model)
    if gemma:
        checkpoint = GgufCheckpoint(file, model_config, gguf_gemma3.LAYER_TENSORS,
                                    gguf_gemma3.GLOBAL_TENSORS, "Gemma 3", gguf_gemma3.restore)
    else:
        checkpoint = GgufCheckpoint(file, model_config)

    tokenizer, notes = gguf_tokenizer(file.metadata)
    for note in notes:
        print(f"note: {note}")
    params = (hf_gemma3_params if gemma else hf_llama_params)(checkpoint, model_config)
    write_workdir(workdir, config, params, tokenizer)

    types: dict[str, int] = {}
    for tensor in file.tensors.values():
        types[_type_name(tensor.tensor_type)] = types.get(_type_name(tensor.tensor_type), 0) + 1
    m = config.model
    layers = f"Gemma 3, {layers_description(m)}" if gemma else f"{m.num_layers} layers"
    return (f"converted {src} -> {workdir}: {layers}, d_model {m.d_model}, "
            f"{m.num_heads} query / {m.num_kv_heads} key-value heads, vocab {m.vocab_size}, "
            f"{'tied' if m.tie_embeddings else 'untied'} embeddings; tensors "
            f"{', '.join(f'{n} {k}' for k, n in sorted(types.items()))} dequantized to float32; "
            f"{'tokenizer ' + data.TOKENIZER_FILE if tokenizer is not None else 'no tokenizer'}; "
            f"{time.perf_counter() - start:.1f} s")
