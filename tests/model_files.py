"""Small model files the converter tests write and read (test modules import this, never
each other): Hugging Face Llama folders, mqa workdirs, GGUF files.

- `llama_style_tokenizer`: a SentencePiece-style vocabulary like Llama 2's; `save_hf_llama`:
  a random tiny LlamaForCausalLM saved by transformers (skips without torch).
- `random_params`, `tiny_workdir`: a configs/tiny.py workdir with random parameters and a
  BPE or byte tokenizer, written without compiling anything.
- `tiny_gguf`, `add_metadata`, `random_k_quant`, `write_gguf_file`: GGUF files written with
  gguf.GGUFWriter.
- `damage`: a checkpoint made unreadable, as a crash or a full disk leaves one.
"""

import json
import pathlib

import gguf
import jax
import numpy as np
import pytest
import tokenizers
from flax import nnx
from gguf import GGMLQuantizationType as T
from tokenizers import decoders, models, normalizers, trainers

from commands import REPO
from mqa import data
from mqa.config import build_model_config, load_config_file
from mqa.model import Transformer
from mqa.workdir import params_from_names, write_workdir

LLAMA_TEXT = "the cat sat on the mat.\nthe dog sat on the log.\n"
WORKDIR_TEXT = "the cat sat on the mat.\nthe dog sat on the log.\nnaïve café, 42 🙂\n"


def llama_style_tokenizer() -> tokenizers.Tokenizer:
    """A SentencePiece-style vocabulary like Llama 2's: <unk> <s> </s>, the 256 byte
    tokens <0x00>..<0xFF> for byte fallback, then "▁"-marked pieces learnt on LLAMA_TEXT."""
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    pieces = tokenizers.Tokenizer(models.BPE())
    pieces.normalizer = normalizer
    pieces.train_from_iterator(LLAMA_TEXT.splitlines(), trainers.BpeTrainer(vocab_size=40, show_progress=False))
    learnt = json.loads(pieces.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learnt["vocab"], key=learnt["vocab"].get):
        vocab[piece] = len(vocab)
    merges = [tuple(merge) for merge in learnt["merges"]]
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tokenizer


def save_hf_llama(src: pathlib.Path, *, kv_heads: int, tied: bool, vocab_size: int,
                  bfloat16: bool = False, max_shard_size: str | None = None):
    """Saves a random tiny LlamaForCausalLM to src; returns it in float32 (the reference)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
        intermediate_size=96, vocab_size=vocab_size, max_position_embeddings=64, rope_theta=500.0,
        rms_norm_eps=1e-6, tie_word_embeddings=tied, initializer_range=0.1,
        attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):  # they start at ones, which would hide a mix-up
                weight.uniform_(0.5, 1.5)
    shards = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if not bfloat16:
        model.save_pretrained(src, safe_serialization=True, **shards)
        return model
    # As most released checkpoints are. The reference is what transformers computes from them
    # in float32 (model.float() would keep the RoPE frequencies rounded to bfloat16).
    model.to(torch.bfloat16).save_pretrained(src, safe_serialization=True, **shards)
    return transformers.LlamaForCausalLM.from_pretrained(
        src, dtype=torch.float32, attn_implementation="eager").eval()


def random_params(config, seed: int = 1) -> nnx.State:
    """Random parameters in numpy (no JAX compilation): norm scales in [0.5, 1.5] (ones
    would hide a mix-up), matrices N(0, 1/fan_in), a large embedding (clear-cut next-token
    choices)."""
    model_config = build_model_config(config.model)
    abstract = nnx.split(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))[1]
    rng = np.random.default_rng(seed)
    arrays = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract)):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if "scale" in name:
            arrays[name] = rng.uniform(0.5, 1.5, leaf.shape)
        elif name == "embed":
            arrays[name] = rng.normal(0.0, 0.5, leaf.shape)
        else:  # [layers,] in..., out...: fan-in is d_model, heads x head_dim, or mlp_dim
            fan_in = {"out": model_config.d_model, "down": model_config.mlp_dim}.get(
                name.rsplit(".", 1)[-1], model_config.d_model)
            arrays[name] = rng.normal(0.0, fan_in ** -0.5, leaf.shape)
    return params_from_names(model_config, {k: v.astype(np.float32) for k, v in arrays.items()})


def tiny_workdir(path: pathlib.Path, *overrides: str, tokenizer: str = "bpe") -> pathlib.Path:
    """A configs/tiny.py workdir with random parameters and a BPE (or byte) tokenizer."""
    overrides = [f"data.tokenizer={tokenizer}", *overrides]
    saved = path.parent / f"{path.name}-tokenizer"
    if tokenizer == "bpe":
        bpe = data.BpeTokenizer.train(WORKDIR_TEXT * 4, vocab_size=300)
        bpe.save(saved)
        overrides += [f"model.vocab_size={bpe.vocab_size}", "data.bpe_vocab_size=300"]
    else:
        data.ByteTokenizer().save(saved)
    tokenizer_file = saved / data.TOKENIZER_FILE
    config = load_config_file(REPO / "configs" / "tiny.py", overrides)
    write_workdir(path, config, random_params(config), tokenizer_file)
    return path


def random_k_quant(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random blocks of a K-quant (which gguf cannot quantize) whose float16 scales are
    small, so the values are weights of a sensible size (layouts from ggml-common.h)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype in (T.Q4_K, T.Q5_K):  # half d, half dmin, then 6-bit scales/mins and quants
        levels = 16 if qtype == T.Q4_K else 32  # dmin = d * mean level: values centred on 0
        scales = np.array([2e-4, 2e-4 * (levels - 1) / 2], np.float16)
        raw[..., 0:4] = np.frombuffer(scales.tobytes(), np.uint8)
    elif qtype == T.Q6_K:          # quants, int8 scales, then half d
        raw[..., 208:210] = np.frombuffer(np.array([5e-5], np.float16).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def add_metadata(writer, metadata: dict) -> None:
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_array(key, value)


def tiny_gguf(path: pathlib.Path, arch: str = "llama", qtype=T.F32, metadata=None,
              extra_tensors=()) -> pathlib.Path:
    """A minimal 1-layer Llama GGUF with zero weights (no torch needed)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 64),
                       (writer.add_embedding_length, 32), (writer.add_feed_forward_length, 64),
                       (writer.add_head_count, 2), (writer.add_head_count_kv, 2),
                       (writer.add_layer_norm_rms_eps, 1e-6)):
        add(value)
    add_metadata(writer, metadata or {})
    shapes = {"token_embd.weight": (16, 32), "output_norm.weight": (32,)}
    shapes.update({f"blk.0.{name}.weight": shape for name, shape in (
        ("attn_norm", (32,)), ("ffn_norm", (32,)), ("attn_q", (32, 32)), ("attn_k", (32, 32)),
        ("attn_v", (32, 32)), ("attn_output", (32, 32)), ("ffn_gate", (64, 32)),
        ("ffn_up", (64, 32)), ("ffn_down", (32, 64)))})
    shapes.update({name: (32,) for name in extra_tensors})
    for name, shape in shapes.items():
        if name == "blk.0.attn_q.weight" and qtype != T.F32:
            writer.add_tensor(name, np.zeros(shape, np.int8), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.zeros(shape, np.float32))
    return write_gguf_file(writer, path)


def write_gguf_file(writer, path: pathlib.Path) -> pathlib.Path:
    """Writes out and closes a filled gguf.GGUFWriter; returns `path`."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def damage(step_dir: pathlib.Path, how: str) -> None:
    """Damages the checkpoint in STEP_DIR: "truncated" cuts its biggest params file to a third,
    anything else removes its params manifest."""
    params = step_dir / "params"
    if how == "truncated":
        biggest = max((p for p in params.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        with biggest.open("r+b") as f:
            f.truncate(biggest.stat().st_size // 3)
    else:
        (params / "manifest.ocdbt").unlink()
