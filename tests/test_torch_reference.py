"""The PyTorch model the benchmarks compare against computes what mqa's does.

benchmarks/decode.py and train_throughput.py time `benchmarks/torch_model.py` side by side
with mqa; these tests keep that comparison honest: the same weights give the same logits,
and its hand-written cached decoding loop gives mqa.generate's greedy tokens.
"""

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from benchmarks.torch_model import TorchTransformer, load_jax_params, make_decode_loop  # noqa: E402
from helpers import loaded, make  # noqa: E402
from mqa.config import build_model_config  # noqa: E402
from mqa.decode import generate  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compile", "one_torch_thread")

CONFIG = build_model_config(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=1,
                     head_dim=8, mlp_dim=64, max_seq_len=64)


def both(num_kv_heads: int):
    model = make(num_kv_heads, config=CONFIG, num_kv_heads=num_kv_heads)
    torch_model = load_jax_params(TorchTransformer(model.config), nnx.state(model, nnx.Param)).eval()
    return loaded(model), torch_model


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_the_torch_model_gives_mqas_logits(num_kv_heads):
    model, torch_model = both(num_kv_heads)
    tokens = np.random.default_rng(1).integers(0, 256, (2, 24))
    expected = np.asarray(model(tokens), np.float64)
    with torch.no_grad():
        got = torch_model(torch.from_numpy(tokens)).numpy().astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_the_torch_decoding_loop_gives_mqas_greedy_tokens(num_kv_heads):
    model, torch_model = both(num_kv_heads)
    prompt = np.random.default_rng(2).integers(0, 256, (3, 6))
    expected = generate(model, prompt, 10)
    # The timed loop, after the prompt has been written into its cache token by token.
    run, cache, angles = make_decode_loop(torch_model, batch=3, context=6, steps=9)
    with torch.inference_mode():
        for position in range(6):
            logits = torch_model.decode(torch.from_numpy(prompt[:, position]), cache, position,
                                        angles)
    first = logits.argmax(-1)
    got = np.concatenate([prompt, first[:, None].numpy(), run(first).numpy()], axis=1)
    np.testing.assert_array_equal(got, expected)

