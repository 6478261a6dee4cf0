"""mqa.convert hf-llama: converted tiny random Llamas give transformers' logits; bad input.

The parity tests need torch and transformers (requirements-test.txt) and are skipped
without them; the error tests need neither.
"""

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

import mqa
from mqa import data
from commands import refusal
from model_files import llama_style_tokenizer, save_hf_llama
from mqa.convert.__main__ import main as convert_cli
from transformers_utils import hf_logits, relative_error

pytestmark = pytest.mark.usefixtures("fast_compile")  # tests of values: XLA's quick compile

TEXT = "the cat sat on the mat.\nthe dog sat on the log.\n"
ROUND_TRIP = "the cat sat on the log.\nnaïve café, 42 🙂"

# A tiny Llama in Hugging Face's config.json layout (transformers 4), for the error tests.
HF_CONFIG = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=96, vocab_size=101, hidden_act="silu",
                 max_position_embeddings=64, rope_theta=500.0, rope_scaling=None, rms_norm_eps=1e-6,
                 tie_word_embeddings=True)


def to_transformers4_config(src: pathlib.Path) -> None:
    """Rewrites config.json with rope_theta + rope_scaling, as transformers 4 wrote it."""
    config = json.loads((src / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config.update(rope_theta=rope.get("rope_theta", config.get("rope_theta")), rope_scaling=None)
    (src / "config.json").write_text(json.dumps(config))


CASES = {  # name: (num_key_value_heads, tied, options)
    "mha-tied": (4, True, {}),
    "gqa-untied": (2, False, {}),
    "mqa-tied": (1, True, {}),
    "mqa-untied-sharded": (1, False, {"max_shard_size": "20KB"}),
    "gqa-tied-bfloat16": (2, True, {"bfloat16": True}),
    "gqa-untied-transformers4-config": (2, False, {"transformers4": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_converted_logits_match_transformers(case, tmp_path, capsys):
    kv_heads, tied, options = CASES[case]
    src, out = tmp_path / "hf", tmp_path / "out"
    tokenizer = llama_style_tokenizer()
    vocab_size = tokenizer.get_vocab_size()
    model = save_hf_llama(src, kv_heads=kv_heads, tied=tied, vocab_size=vocab_size,
                          bfloat16=options.get("bfloat16", False),
                          max_shard_size=options.get("max_shard_size"))
    tokenizer.save(str(src / "tokenizer.json"))
    if options.get("transformers4"):
        to_transformers4_config(src)
    if "max_shard_size" in options:
        assert len(list(src.glob("*.safetensors"))) > 1 and (src / "model.safetensors.index.json").is_file()

    convert_cli(["hf-llama", "--src", str(src), "--workdir", str(out)])
    assert "converted" in capsys.readouterr().out
    loaded = mqa.load_model(out)
    m = loaded.config.model
    assert (m.num_heads, m.num_kv_heads, m.head_dim, m.tie_embeddings) == (4, kv_heads, 16, tied)
    assert (m.rope_theta, m.norm_eps, m.max_seq_len, loaded.config.train.seq_len) == (500.0, 1e-6, 64, 64)

    tokens = np.random.default_rng(0).integers(0, vocab_size, size=(2, 24), dtype=np.int32)
    error = relative_error(loaded(tokens), hf_logits(model, tokens))
    print(f"{case}: max relative logit error {error:.2e}")
    assert error < 1e-4


def test_sharded_checkpoint_converts_to_the_same_params(tmp_path):
    params = {}
    for name, shards in (("one", None), ("many", "20KB")):
        save_hf_llama(tmp_path / name, kv_heads=2, tied=False, vocab_size=101, max_shard_size=shards)
        convert_cli(["hf-llama", "--src", str(tmp_path / name), "--workdir", str(tmp_path / f"{name}-out")])
        params[name] = ocp.StandardCheckpointer().restore(tmp_path / f"{name}-out" / "checkpoints" / "0" / "params")
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 1
    assert jax.tree.structure(params["one"]) == jax.tree.structure(params["many"])
    assert jax.tree.all(jax.tree.map(np.array_equal, params["one"], params["many"]))


def test_llama_style_tokenizer_is_copied_and_round_trips(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "out"
    tokenizer = llama_style_tokenizer()
    save_hf_llama(src, kv_heads=1, tied=True, vocab_size=tokenizer.get_vocab_size())
    tokenizer.save(str(src / "tokenizer.json"))
    convert_cli(["hf-llama", "--src", str(src), "--workdir", str(out)])

    loaded = mqa.load_model(out).tokenizer
    ids = loaded.encode(ROUND_TRIP)
    assert ids.tolist() == tokenizer.encode(ROUND_TRIP).ids  # no BOS added
    assert "<0x0A>" in [tokenizer.id_to_token(i) for i in ids]  # the newline took byte fallback
    assert loaded.decode(ids) == ROUND_TRIP
    assert loaded.decode_bytes(ids) == ROUND_TRIP.encode("utf-8")


def test_byte_level_tokenizer_is_copied_and_round_trips(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "out"
    tokenizer = data.BpeTokenizer.train(TEXT * 4, vocab_size=300)
    save_hf_llama(src, kv_heads=2, tied=True, vocab_size=tokenizer.vocab_size)
    tokenizer.save(src)
    convert_cli(["hf-llama", "--src", str(src), "--workdir", str(out)])

    loaded = mqa.load_model(out).tokenizer
    ids = loaded.encode(ROUND_TRIP)
    assert np.array_equal(ids, tokenizer.encode(ROUND_TRIP))
    assert loaded.decode(ids) == ROUND_TRIP
    assert loaded.decode_bytes(ids[:1]) + loaded.decode_bytes(ids[1:]) == ROUND_TRIP.encode("utf-8")


def test_source_without_tokenizer_converts_with_a_note(tmp_path, capsys):
    src, out = tmp_path / "hf", tmp_path / "out"
    save_hf_llama(src, kv_heads=2, tied=True, vocab_size=101)
    convert_cli(["hf-llama", "--src", str(src), "--workdir", str(out)])
    assert "no tokenizer.json" in capsys.readouterr().out
    assert not (out / "tokenizer.json").exists()
    assert mqa.load_model(out).tokenizer is None


# ----------------------------------------------------------------------------- bad input


def write_config(src: pathlib.Path, **changes) -> pathlib.Path:
    src.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text(json.dumps({**HF_CONFIG, **changes}))
    return src


def convert_error(capfd, src, out) -> str:
    return refusal(capfd, "hf-llama", "--src", src, "--workdir", out)


def test_missing_src_is_a_one_line_error(tmp_path, capfd):
    message = convert_error(capfd, tmp_path / "no-such-model", tmp_path / "out")
    assert "no-such-model" in message and "does not exist" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, named", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling="),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0}},
     "rope_parameters="),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"model_type": "qwen2"}, "model_type='qwen2'"),
    ({"num_key_value_heads": 3}, "model.num_kv_heads=3"),
])
def test_unsupported_config_is_a_one_line_error(tmp_path, capfd, changes, named):
    message = convert_error(capfd, write_config(tmp_path / "hf", **changes), tmp_path / "out")
    assert named in message
    assert not (tmp_path / "out").exists()


def test_source_without_weights_is_a_one_line_error(tmp_path, capfd):
    assert "has no *.safetensors" in convert_error(capfd, write_config(tmp_path / "hf"), tmp_path / "out")


def test_weights_that_do_not_fit_the_config_are_a_one_line_error(tmp_path, capfd):
    src = tmp_path / "hf"
    save_hf_llama(src, kv_heads=2, tied=True, vocab_size=101)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 1}))
    message = convert_error(capfd, src, tmp_path / "out")
    assert "'model.layers.0.self_attn.k_proj.weight' has shape (32, 64)" in message
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert "'model.layers.2.self_attn.q_proj.weight' is missing" in convert_error(capfd, src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps(config))
    safetensors.numpy.save_file({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)},
                                src / "bias.safetensors")
    assert "'model.layers.0.self_attn.q_proj.bias'" in convert_error(capfd, src, tmp_path / "out")


def test_existing_workdir_is_not_overwritten(tmp_path, capfd):
    src, out = tmp_path / "hf", tmp_path / "out"
    save_hf_llama(src, kv_heads=2, tied=True, vocab_size=101)
    convert_cli(["hf-llama", "--src", str(src), "--workdir", str(out)])
    assert "already holds a workdir" in convert_error(capfd, src, out)
