"""Converts checkpoints made elsewhere, or with other K/V heads, into mqa workdirs.

  python -m mqa.convert hf-llama --src DIR --workdir OUT

reads a local Hugging Face Llama-architecture checkpoint (config.json and *.safetensors,
sharded or not; MHA, GQA or MQA; tied or untied embeddings) and writes a workdir that
`mqa.load_model(OUT)` and the evaluation tools read: OUT/config.json (a full experiment
config), OUT/checkpoints/0/params, and OUT/tokenizer.json when the source has one. Weights
are read with safetensors' numpy API and cast to float32, so conversion needs no torch.

  python -m mqa.convert uptrain --src RUN --num_kv_heads K --workdir OUT [--init mean]
      [--group adjacent|similarity]

turns a workdir of ours (MHA or GQA) into one with K key/value heads, as the starting point
of uptraining (Ainslie et al. 2023): `train.py --config.train.init_from=OUT`. The heads
pooled together are adjacent ones, or (`--group similarity`) those whose attention
patterns are most alike (`mqa.head_similarity`).

  python -m mqa.convert gguf --src FILE.gguf --workdir OUT

reads a llama.cpp GGUF file of a Llama (F32, F16, BF16 or quantized, dequantized to
float32) and its tokenizer; see `mqa.gguf_llama`.

  python -m mqa.convert to-hf --src WORKDIR --out DIR [--step N]

writes a workdir of ours as a Hugging Face Llama folder; see `mqa.export_hf`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so bf16 safetensors load
import numpy as np
import safetensors
import tokenizers
from flax import nnx

from mqa import accounting, data
from mqa.checkpoint import Checkpointer
from mqa.config import ConfigError, ModelConfig, build_model_config, default_config, validate
from mqa.loading import CheckpointError, load_model
from mqa.model import Transformer


class ConvertError(ValueError):
    """The source cannot be converted; the message is one line naming the value."""


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


def llama_config(model: dict) -> ml_collections.ConfigDict:
    """The default experiment config with these `model` fields, train.seq_len capped at
    model.max_seq_len, validated (a ConfigError names a bad value)."""
    config = default_config()
    config.model.update(model)
    config.train.seq_len = min(config.train.seq_len, config.model.max_seq_len)
    return validate(config)


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
    """The tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""

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


def hf_llama_params(checkpoint: SafetensorsCheckpoint, config: ModelConfig) -> nnx.State:
    """The HF weights in mqa's layout, as the `nnx.State` that `nnx.split(Transformer)` gives.

    HF projections are stored [out, in] (y = x @ W.T); ours are [in, ...] with heads split
    out, and each block parameter is stacked along a leading [num_layers] axis.
    """
    v, m, f = config.vocab_size, config.d_model, config.mlp_dim
    h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
    per_layer = {  # ours: (HF tensor in model.layers.{i}, its shape, HF -> ours)
        "blocks.attention.q": ("self_attn.q_proj.weight", (h * d, m), lambda w: w.T.reshape(m, h, d)),
        "blocks.attention.k": ("self_attn.k_proj.weight", (kv * d, m), lambda w: w.T.reshape(m, kv, d)),
        "blocks.attention.v": ("self_attn.v_proj.weight", (kv * d, m), lambda w: w.T.reshape(m, kv, d)),
        "blocks.attention.out": ("self_attn.o_proj.weight", (m, h * d), lambda w: w.T.reshape(h, d, m)),
        "blocks.attention_norm.scale": ("input_layernorm.weight", (m,), lambda w: w),
        "blocks.mlp_norm.scale": ("post_attention_layernorm.weight", (m,), lambda w: w),
        "blocks.mlp.gate": ("mlp.gate_proj.weight", (f, m), np.transpose),
        "blocks.mlp.up": ("mlp.up_proj.weight", (f, m), np.transpose),
        "blocks.mlp.down": ("mlp.down_proj.weight", (m, f), np.transpose),
    }
    layer_names = {f"model.layers.{i}.{suffix}" for i in range(config.num_layers)
                   for suffix, _, _ in per_layer.values()}
    known = layer_names | {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    unknown = sorted(n for n in checkpoint.names() - known if not n.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise ConvertError(f"tensor {unknown[0]!r} ({len(unknown)} unexpected in all) has no place "
                           "in a plain Llama; this converter does not handle that variant")

    arrays = {
        ours: np.stack([transform(checkpoint.get(f"model.layers.{i}.{suffix}", shape))
                        for i in range(config.num_layers)])
        for ours, (suffix, shape, transform) in per_layer.items()
    }
    arrays["embed"] = checkpoint.get("model.embed_tokens.weight", (v, m))
    arrays["final_norm.scale"] = checkpoint.get("model.norm.weight", (m,))
    if not config.tie_embeddings:  # when tied, transformers ignores a stored lm_head; so do we
        arrays["unembed"] = checkpoint.get("lm_head.weight", (v, m)).T
    return _fill(config, arrays)


def _fill(config: ModelConfig, arrays: dict[str, np.ndarray]) -> nnx.State:
    """The Transformer's parameter State with each leaf taken from arrays[dotted name]."""
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)

    def leaf(path, expected):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if arrays[name].shape != expected.shape:  # a bug here, not in the input: shapes were checked
            raise ConvertError(f"converted {name} has shape {arrays[name].shape}; the model "
                               f"expects {expected.shape}")
        return jnp.asarray(arrays[name], expected.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(leaf, nnx.to_pure_dict(state)))
    return state


# ----------------------------------------------------------------------------- workdir


def convert_hf_llama(src: str | pathlib.Path, workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Writes the workdir for the HF Llama checkpoint in `src`; returns its config."""
    src, workdir = pathlib.Path(src).expanduser(), pathlib.Path(workdir).expanduser()
    if not (src / "config.json").is_file():
        what = "does not exist" if not src.exists() else "has no config.json"
        raise ConvertError(f"--src {str(src)!r} {what}; give a Hugging Face model directory "
                           "with config.json and *.safetensors")
    try:
        hf = json.loads((src / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise ConvertError(f"{src / 'config.json'} is not valid JSON: {error}") from None
    config = hf_llama_config(hf)
    _check_new_workdir(workdir)
    model_config = build_model_config(config.model)
    params = hf_llama_params(SafetensorsCheckpoint(src), model_config)
    _write_workdir(workdir, config, params, _checked_tokenizer(src, model_config.vocab_size))
    return config


def _check_new_workdir(workdir: pathlib.Path) -> None:
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise ConvertError(f"--workdir {str(workdir)!r} is not empty: it already holds a workdir "
                           "or other files; give a new or empty directory")


def _write_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, params: nnx.State,
                   tokenizer: pathlib.Path | tokenizers.Tokenizer | None) -> None:
    """OUT/checkpoints/0/params, the tokenizer if any (a file to copy, or a `tokenizers`
    Tokenizer to save), then OUT/config.json."""
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpointer(workdir / "checkpoints")
    checkpoints.save_params(0, params)
    checkpoints.close()
    if isinstance(tokenizer, tokenizers.Tokenizer):
        data.BpeTokenizer(tokenizer).save(workdir)
    elif tokenizer is not None:
        shutil.copyfile(tokenizer, workdir / data.TOKENIZER_FILE)
    (workdir / "config.json").write_text(config.to_json(indent=2))  # last: marks a complete workdir


def _checked_tokenizer(src: pathlib.Path, vocab_size: int) -> pathlib.Path | None:
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


# ----------------------------------------------------------------------------- uptraining

KV_INITS = ("mean", "first", "random")
KV_PROJECTIONS = ("blocks.attention.k", "blocks.attention.v")


def pool_kv_heads(kernel: np.ndarray, num_kv_heads: int, init: str) -> np.ndarray:
    """K or V projections [..., src_kv_heads, head_dim] -> [..., num_kv_heads, head_dim].

    Group g holds source heads g*r ... g*r+r-1 (r = src_kv_heads / num_kv_heads), the query
    heads of which all read new head g; `init` "mean" averages them (in float64), "first"
    keeps head g*r.
    """
    *lead, heads, head_dim = kernel.shape
    groups = kernel.reshape(*lead, num_kv_heads, heads // num_kv_heads, head_dim)
    if init == "first":
        return groups[..., 0, :]
    return groups.astype(np.float64).mean(axis=-2).astype(kernel.dtype)


def uptrain_params(params: nnx.State, source: ModelConfig, num_kv_heads: int, init: str,
                   seed: int = 0) -> nnx.State:
    """The source model's parameters with K/V projections [layers, m, src_kv_heads, d]
    turned into [layers, m, num_kv_heads, d] (with cross-layer KV sharing: the `blocks`
    that own K/V, [num_kv_layers, ...]); every other parameter is copied unchanged.

    init: "mean" or "first" (see `pool_kv_heads`), or "random": K and V as a fresh
    Transformer with the new shapes initialises them (`nnx.Rngs(seed)`).
    """
    target = dataclasses.replace(source, num_kv_heads=num_kv_heads)
    arrays = _dotted_arrays(params)
    if init == "random":
        fresh = _dotted_arrays(nnx.split(Transformer(target, rngs=nnx.Rngs(seed)))[1])
        arrays.update({name: fresh[name] for name in KV_PROJECTIONS})
    else:
        arrays.update({name: pool_kv_heads(arrays[name], num_kv_heads, init)
                       for name in KV_PROJECTIONS})
    return _fill(target, arrays)


def _dotted_arrays(params: nnx.State) -> dict[str, np.ndarray]:
    """{"blocks.attention.k": array, ...}: the leaves of a parameter State by dotted name."""
    return {jax.tree_util.keystr(path, simple=True, separator="."): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))}


def uptrain_config(config: ml_collections.ConfigDict, source: ModelConfig,
                   num_kv_heads: int) -> ml_collections.ConfigDict:
    """The source's experiment config with `num_kv_heads`; a widened MLP
    (match_mha_params) is written out as its explicit mlp_dim so the shapes stay the source's."""
    src_kv = source.num_kv_heads
    valid = [k for k in range(1, src_kv + 1) if src_kv % k == 0]
    if num_kv_heads not in valid:
        why = ("exceeds" if num_kv_heads > src_kv else "does not divide" if num_kv_heads > 0
               else "must be >= 1 and divide")
        raise ConvertError(f"--num_kv_heads {num_kv_heads} {why} the source's model.num_kv_heads="
                           f"{src_kv}; valid: {', '.join(map(str, valid))}")
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.num_kv_heads = num_kv_heads
    if config.model.match_mha_params:
        config.model.update(mlp_dim=source.mlp_dim, match_mha_params=False)
    return validate(config)


KV_GROUPINGS = ("adjacent", "similarity")


def similarity_order(source, num_kv_heads: int, text: str | None) -> tuple[nnx.State, list[list[int]]]:
    """The source's parameters with each K/V layer's heads reordered so that the heads whose
    attention patterns are most alike (on `text`, default the run's held-out split) sit in
    the same group of the pooling (`head_similarity`); the function is unchanged. Returns
    (parameters, per K/V layer the new order of its heads)."""
    from mqa import analysis, head_similarity
    seq_len = min(source.config.train.seq_len, 256)
    tokens = analysis.analysis_tokens(source, text, windows=8, seq_len=seq_len)
    layers = head_similarity.analyse(source.module(), tokens)
    orders = head_similarity.kv_group_orders(layers, source.model_config, num_kv_heads)
    arrays = head_similarity.permute_heads(_dotted_arrays(source.params), source.model_config, orders)
    return _fill(source.model_config, arrays), orders


def convert_uptrain(src: str | pathlib.Path, workdir: str | pathlib.Path, num_kv_heads: int,
                    init: str = "mean", step: int | None = None, group: str = "adjacent",
                    text: str | None = None) -> str:
    """Writes the model in `src` (a workdir or checkpoint of ours; `step`: default the
    newest) with `num_kv_heads` K/V heads as a new workdir; returns a one-line summary.

    group: "adjacent" pools heads g*r .. g*r+r-1; "similarity" first reorders each layer's
    heads so that those with the most alike attention patterns on `text` are pooled
    together (`similarity_order`)."""
    if group not in KV_GROUPINGS:
        raise ConvertError(f"--group {group!r} is not one of: {', '.join(KV_GROUPINGS)}")
    workdir = pathlib.Path(workdir).expanduser()
    _check_new_workdir(workdir)
    source = load_model(src, step=step)
    if source.model_config.attention != "grouped":
        raise ConvertError(f"the source has model.attention={source.model_config.attention!r}; "
                           "uptrain pools the K/V heads of model.attention='grouped' only")
    config = uptrain_config(source.config, source.model_config, num_kv_heads)
    params, grouping = source.params, ""
    size = source.model_config.num_kv_heads // num_kv_heads
    if group == "similarity":
        if source.model_config.sliding_window:
            raise ConvertError(f"--group similarity: the source has model.sliding_window="
                               f"{source.model_config.sliding_window}, which the head analysis does "
                               "not model; use --group adjacent")
        params, orders = similarity_order(source, num_kv_heads, text)
        grouping = "; groups by attention similarity, per K/V layer: " + " ".join(
            "".join(f"({','.join(map(str, order[i:i + size]))})" for i in range(0, len(order), size))
            for order in orders)
    params = uptrain_params(params, source.model_config, num_kv_heads, init,
                            seed=config.train.seed)
    tokenizer = source.path / data.TOKENIZER_FILE
    _write_workdir(workdir, config, params, tokenizer if tokenizer.is_file() else None)

    before, after = source.model_config, build_model_config(config.model)
    how = {"mean": f"mean-pooled in groups of {size}", "first": f"first head of each group of {size}",
           "random": "re-initialised"}[init]
    return (f"uptrained {src} (step {source.step}) -> {workdir}: K/V heads {before.num_kv_heads} -> "
            f"{num_kv_heads} ({how}); parameters {accounting.param_count(before):,} -> "
            f"{accounting.param_count(after):,}; KV cache {accounting.kv_cache_bytes_per_token(before):,}"
            f" -> {accounting.kv_cache_bytes_per_token(after):,} bytes/token{grouping}")


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mqa.convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    hf_llama = commands.add_parser(
        "hf-llama", help="a Hugging Face Llama checkpoint (config.json + *.safetensors)")
    hf_llama.add_argument("--src", required=True, help="the Hugging Face model directory")
    hf_llama.add_argument("--workdir", required=True, help="the mqa workdir to write (new or empty)")
    uptrain = commands.add_parser(
        "uptrain", help="a workdir of ours with fewer K/V heads, to uptrain (MHA -> GQA/MQA)")
    uptrain.add_argument("--src", required=True, help="the workdir or checkpoint directory to convert")
    uptrain.add_argument("--num_kv_heads", required=True, type=int,
                         help="K/V heads of the result; must divide the source's")
    uptrain.add_argument("--workdir", required=True, help="the mqa workdir to write (new or empty)")
    uptrain.add_argument("--init", choices=KV_INITS, default="mean",
                         help="new K/V heads: mean-pool each group, its first head, or random")
    uptrain.add_argument("--step", type=int, help="the source's checkpoint step (default: newest)")
    uptrain.add_argument("--group", choices=KV_GROUPINGS, default="adjacent",
                         help="which heads share a K/V head: adjacent ones, or those whose "
                         "attention patterns are most alike (python -m mqa.analysis heads)")
    uptrain.add_argument("--text", default=None, help="with --group similarity: the text the "
                         "patterns are measured on (default: the run's held-out split)")
    gguf = commands.add_parser(
        "gguf", help="a llama.cpp GGUF file of a Llama (F32, F16, BF16 or quantized)")
    gguf.add_argument("--src", required=True, help="the .gguf file")
    gguf.add_argument("--workdir", required=True, help="the mqa workdir to write (new or empty)")
    to_hf = commands.add_parser(
        "to-hf", help="a workdir of ours as a Hugging Face Llama folder (LlamaForCausalLM)")
    to_hf.add_argument("--src", required=True, help="the workdir or checkpoint directory to export")
    to_hf.add_argument("--out", required=True, help="the folder to write (new or empty)")
    to_hf.add_argument("--step", type=int, help="the source's checkpoint step (default: newest)")
    args = parser.parse_args(argv)
    try:
        if args.command == "uptrain":
            print(convert_uptrain(args.src, args.workdir, args.num_kv_heads, args.init, args.step,
                                  args.group, args.text))
            return
        if args.command == "gguf":
            from mqa.gguf_llama import convert_gguf  # imports this module
            print(convert_gguf(args.src, args.workdir))
            return
        if args.command == "to-hf":
            from mqa.export_hf import export_hf  # imports this module
            print(export_hf(args.src, args.out, args.step))
            return
        config = convert_hf_llama(args.src, args.workdir)
    except (ConvertError, ConfigError, CheckpointError, data.DataError) as error:
        sys.exit(f"error: {' '.join(str(error).split())}")
    m = config.model
    print(f"converted {args.src} -> {args.workdir}: {m.num_layers} layers, d_model {m.d_model}, "
          f"{m.num_heads} query / {m.num_kv_heads} key-value heads, vocab {m.vocab_size}, "
          f"{'tied' if m.tie_embeddings else 'untied'} embeddings")


if __name__ == "__main__":
    main()
