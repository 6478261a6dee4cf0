"""mqa.convert to-hf (mqa.convert.to_hf): exported workdirs load in transformers with the same logits, greedy
continuations and token ids; hf-llama then to-hf gives back the tensors bit for bit; models
Llama cannot express are one-line errors.

Workdirs are random configs/tiny.py-sized models written straight to disk (no training
run). The parity tests need torch and transformers and are skipped without them.
"""

import json
import pathlib

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import mqa
from mqa import data
from mqa.checkpoint import Checkpointer
from mqa.config import build_model_config, ModelConfig, load_config_file
from mqa.convert.__main__ import main as convert_cli
from mqa.model import Transformer
from mqa.workdir import params_by_name, params_from_names, write_workdir
from tests.test_convert import llama_style_tokenizer, refusal, save_hf_llama

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXT = "the cat sat on the mat.\nthe dog sat on the log.\nnaïve café, 42 🙂\n"
SAMPLES = ["the cat sat on the log.", "naïve café — déjà vu", "emoji 🙂 and\nnewlines\n\n  x"]


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
        bpe = data.BpeTokenizer.train(TEXT * 4, vocab_size=300)
        bpe.save(saved)
        overrides += [f"model.vocab_size={bpe.vocab_size}", "data.bpe_vocab_size=300"]
    else:
        data.ByteTokenizer().save(saved)
    tokenizer_file = saved / data.TOKENIZER_FILE
    config = load_config_file(REPO / "configs" / "tiny.py", overrides)
    write_workdir(path, config, random_params(config), tokenizer_file)
    return path


def to_hf_error(capfd, src, out) -> str:
    """The one line `python -m mqa.convert to-hf` refuses with."""
    return refusal(capfd, "to-hf", "--src", src, "--workdir", out)


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


CASES = {  # name: config overrides
    "gqa-untied": ["model.tie_embeddings=false"],
    "mqa-tied": ["model.num_kv_heads=1"],
    "mha-untied": ["model.num_kv_heads=4", "model.tie_embeddings=false"],
}


@pytest.mark.parametrize("case", CASES)
def test_exported_model_matches_in_transformers(case, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    workdir = tiny_workdir(tmp_path / "run", *CASES[case])
    convert_cli(["to-hf", "--src", str(workdir), "--out", str(tmp_path / "hf")])
    assert "exported" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]

    ours = mqa.load_model(workdir)
    hf = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager").eval()
    m = ours.model_config
    assert hf.config.num_key_value_heads == m.num_kv_heads
    assert hf.config.tie_word_embeddings == m.tie_embeddings

    tokens = np.random.default_rng(0).integers(0, m.vocab_size, size=(2, 32), dtype=np.int32)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens).long()).logits.numpy()
    error = relative_error(ours(tokens), theirs)
    print(f"{case}: max relative logit error {error:.2e}")
    assert error < 1e-5

    prompt = ours.tokenizer.encode("the cat sat")
    greedy = mqa.generate(ours, prompt, 16, temperature=0.0)
    with torch.no_grad():
        hf_greedy = hf.generate(torch.from_numpy(prompt[None]).long(), max_new_tokens=16, do_sample=False,
                                attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert hf_greedy.numpy().tolist() == greedy.tolist()

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in SAMPLES:
        ids = ours.tokenizer.encode(text).tolist()
        assert tokenizer(text).input_ids == ids
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("kv_heads, tied", [(2, False), (1, True)])
def test_hf_llama_then_to_hf_gives_back_the_tensors(kv_heads, tied, tmp_path):
    src = tmp_path / "hf"
    tokenizer = llama_style_tokenizer()
    save_hf_llama(src, kv_heads=kv_heads, tied=tied, vocab_size=tokenizer.get_vocab_size())
    tokenizer.save(str(src / "tokenizer.json"))
    convert_cli(["hf-llama", "--src", str(src), "--workdir", str(tmp_path / "run")])
    convert_cli(["to-hf", "--src", str(tmp_path / "run"), "--workdir", str(tmp_path / "back")])

    before = safetensors.numpy.load_file(src / "model.safetensors")
    after = safetensors.numpy.load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(after) == sorted(before)  # tied: no lm_head on either side
    for name in before:
        assert after[name].dtype == before[name].dtype == np.float32
        assert after[name].tobytes() == before[name].tobytes(), name
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                  "rms_norm_eps", "tie_word_embeddings", "rope_parameters"):
        assert config[field] == original[field], field


def test_step_picks_the_checkpoint(tmp_path):
    workdir = tiny_workdir(tmp_path / "run")
    config = mqa.load_model(workdir).config
    checkpoints = Checkpointer(workdir / "checkpoints")
    checkpoints.save_params(5, random_params(config, seed=7))
    checkpoints.close()
    for step, name in ((None, "newest"), (0, "first")):
        convert_cli(["to-hf", "--src", str(workdir), "--out", str(tmp_path / name),
                      *([] if step is None else ["--step", str(step)])])
    embed = {name: safetensors.numpy.load_file(tmp_path / name / "model.safetensors")[
        "model.embed_tokens.weight"] for name in ("newest", "first")}
    for name, step in (("newest", 5), ("first", 0)):
        params = params_by_name(mqa.load_model(workdir, step=step).params)
        assert np.array_equal(embed[name], params["embed"]), name
    assert not np.array_equal(embed["newest"], embed["first"])


def test_byte_tokenizer_is_left_out_with_a_note(tmp_path, capsys):
    convert_cli(["to-hf", "--src", str(tiny_workdir(tmp_path / "run", tokenizer="byte")),
                  "--out", str(tmp_path / "hf")])
    out = capsys.readouterr().out
    assert "note: the workdir's tokenizer is mqa's 'byte' tokenizer" in out and "exported" in out
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]


def test_kv_sharing_is_a_one_line_error(tmp_path, capfd):
    workdir = tiny_workdir(tmp_path / "run", "model.kv_share_every=2")
    message = to_hf_error(capfd, workdir, tmp_path / "hf")
    assert "model.kv_share_every=2" in message and "valid: 1" in message
    assert not (tmp_path / "hf").exists()


def test_bad_source_or_destination_is_a_one_line_error(tmp_path, capfd):
    assert "does not exist" in to_hf_error(capfd, tmp_path / "missing", tmp_path / "hf")
    workdir = tiny_workdir(tmp_path / "run")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    message = to_hf_error(capfd, workdir, tmp_path / "full")
    assert "--workdir" in message and "not empty" in message
