"""mqa.convert to-hf (mqa.convert.to_hf): exported workdirs load in transformers with the same logits, greedy
continuations and token ids; hf-llama then to-hf gives back the tensors bit for bit; latent
attention goes out as DeepSeek-V2; models none of them can express are one-line errors.

Workdirs are random configs/tiny.py-sized models written straight to disk (no training
run). The parity tests need torch and transformers and are skipped without them.
"""

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import safetensors.numpy

import mqa
from mqa.checkpoint import Checkpointer
from mqa.convert.__main__ import main as convert_cli
from mqa.workdir import params_by_name
from commands import refusal
from model_files import llama_style_tokenizer, random_params, save_hf_llama, tiny_workdir

pytestmark = pytest.mark.usefixtures("fast_compile")  # tests of values: XLA's quick compile

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = ["the cat sat on the log.", "naïve café — déjà vu", "emoji 🙂 and\nnewlines\n\n  x"]


def to_hf_error(capfd, src, out) -> str:
    """The one line `python -m mqa.convert to-hf` refuses with."""
    return refusal(capfd, "to-hf", "--src", src, "--workdir", out)


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def assert_same_model(case, ours, hf, seq_len):
    """Our model and transformers' `hf` give the same logits on random tokens (relative
    1e-5) and the same 16 greedy tokens after a prompt, each through its own cache."""
    import torch
    tokens = np.random.default_rng(0).integers(0, ours.model_config.vocab_size, size=(2, seq_len),
                                               dtype=np.int32)
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

    assert_same_model(case, ours, hf, seq_len=32)

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in SAMPLES:
        ids = ours.tokenizer.encode(text).tolist()
        assert tokenizer(text).input_ids == ids
        assert tokenizer.decode(ids) == text


LATENT = ["model.attention=latent", "model.kv_latent_dim=24", "model.rope_head_dim=8"]
LATENT_CASES = {  # name: config overrides
    "mla": LATENT,
    # DeepSeek-V2's low-rank queries, non-rotary query/key parts narrower than the values
    "mla-q-latent-nope-untied": [*LATENT, "model.q_latent_dim=20", "model.qk_nope_dim=12",
                                 "model.tie_embeddings=false"],
}


@pytest.mark.parametrize("case", LATENT_CASES)
def test_exported_latent_model_matches_deepseek_v2_in_transformers(case, tmp_path, capsys):
    """Latent attention exports as a DeepseekV2ForCausalLM (every layer dense): the same
    logits as transformers' own MLA, whose rotary pairs are interleaved where ours are
    halves, and the same greedy tokens through both caches (its compressed cache and our
    absorbed decoding)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV2ForCausalLM"):
        pytest.skip("this transformers has no DeepSeek-V2")
    workdir = tiny_workdir(tmp_path / "run", *LATENT_CASES[case])
    convert_cli(["to-hf", "--src", str(workdir), "--out", str(tmp_path / "hf")])
    assert "DeepseekV2ForCausalLM, 2 layers, 4 query heads on a latent of 24" in capsys.readouterr().out

    ours = mqa.load_model(workdir)
    hf = transformers.DeepseekV2ForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager").eval()
    m = ours.model_config
    assert (hf.config.kv_lora_rank, hf.config.qk_rope_head_dim, hf.config.v_head_dim) == (24, 8, 16)
    assert hf.config.qk_nope_head_dim == (m.qk_nope_dim or m.head_dim)
    assert hf.config.q_lora_rank == (m.q_latent_dim or None)
    assert sum(p.numel() for p in hf.parameters()) == mqa.accounting.param_count(m)

    assert_same_model(case, ours, hf, seq_len=48)

    # hf-deepseek-v2 reads the folder back: every parameter bit for bit.
    convert_cli(["hf-deepseek-v2", "--src", str(tmp_path / "hf"), "--workdir", str(tmp_path / "back")])
    back = mqa.load_model(tmp_path / "back")
    # num_kv_heads plays no part in latent attention: DeepSeek-V2's config has it as num_heads
    assert back.model_config == dataclasses.replace(ours.model_config, num_kv_heads=4)
    before, after = params_by_name(ours.params), params_by_name(back.params)
    assert sorted(after) == sorted(before)
    for name in before:
        assert np.asarray(after[name]).tobytes() == np.asarray(before[name]).tobytes(), name


def test_a_dense_deepseek_v2_from_transformers_converts_and_matches(tmp_path, capsys):
    """A DeepSeek-V2 made and saved by transformers itself (random weights, every layer
    dense, low-rank queries, non-rotary parts of 12 beside values of 16) comes in through
    hf-deepseek-v2 with transformers' logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV2ForCausalLM"):
        pytest.skip("this transformers has no DeepSeek-V2")
    config = transformers.DeepseekV2Config(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, first_k_dense_replace=2,
        num_attention_heads=4, kv_lora_rank=24, q_lora_rank=20, qk_nope_head_dim=12,
        qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    torch.manual_seed(0)
    hf = transformers.DeepseekV2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers initialises norms to ones: vary them, or a mix-up hides
        for name, weight in hf.named_parameters():
            if weight.ndim == 1:
                weight.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert_cli(["hf-deepseek-v2", "--src", str(tmp_path / "hf"), "--workdir", str(tmp_path / "run")])
    assert "DeepSeek-V2, 2 dense layers" in capsys.readouterr().out
    ours = mqa.load_model(tmp_path / "run")
    m = ours.model_config
    assert (m.attention, m.kv_latent_dim, m.q_latent_dim, m.rope_head_dim, m.qk_nope_dim, m.head_dim) == (
        "latent", 24, 20, 8, 12, 16)
    tokens = np.random.default_rng(1).integers(0, 96, size=(2, 40), dtype=np.int32)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens).long()).logits.numpy()
    assert relative_error(ours(tokens), theirs) < 1e-5


def test_a_deepseek_v2_with_experts_is_a_one_line_error(tmp_path, capfd):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(
        model_type="deepseek_v2", num_hidden_layers=27, first_k_dense_replace=1)))
    error = refusal(capfd, "hf-deepseek-v2", "--src", tmp_path / "hf", "--workdir", tmp_path / "run")
    assert "first_k_dense_replace=1 < num_hidden_layers=27" in error and "mixture-of-experts" in error
    assert not (tmp_path / "run").exists()


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
