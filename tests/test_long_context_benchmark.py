"""benchmarks/long_context.py's one-line errors, before any model is loaded, and its
kernel column's loop."""

import dataclasses

import pytest
from flax import nnx

from benchmarks import long_context
from helpers import BASE
from mqa.attention import cpu_decode
from mqa.model import Transformer
from mqa.timing import decode_loop
from commands import usage_error


@pytest.mark.parametrize("argv,fragment", [
    (["--model=llama"], "argument --model: invalid choice: 'llama'"),
    (["--model=gemma3", "--batches=0"], "--batches: '0': every value must be at least 1"),
    (["--model=gemma3", "--contexts=2K"], "'2K' is not a comma-separated list of integers"),
    (["--model=smollm2", "--steps=0"], "--steps=0 and --repeats=3 must be at least 1"),
])
def test_bad_arguments_are_one_line_errors(argv, fragment, capsys):
    assert fragment in usage_error(long_context.main, argv, capsys)


def test_defaults_follow_the_model():
    args = long_context.parse(["--model=gemma3"])
    assert args.contexts == [2048, 8192, 32_752] and args.workdir.name == "gemma3_270m"
    args = long_context.parse(["--model=smollm2", "--contexts=512"])
    assert args.contexts == [512] and args.workdir.name == "smollm2"
    assert long_context.parse(["--model=smollm2"]).contexts == [2048, 8176]  # + 16 steps: 8,192


@pytest.mark.skipif(not cpu_decode.compiler_found(), reason="no C++ compiler to build the kernel")
def test_the_kernel_column_decodes_through_the_kernel():
    """`--kernel` times a loop that calls the kernel in every layer, and the plain column
    one that does not: the loaded graphdef carries its own decode_impl."""
    config = dataclasses.replace(BASE, num_layers=2, max_seq_len=64)
    graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    graphdefs = long_context.timed_graphdefs(graphdef, config, kernel=True)
    calls = {}
    for name, timed_graphdef in graphdefs.items():
        _, hlo, _ = decode_loop(timed_graphdef, params, config, 2, 16, 2)
        calls[name] = hlo().count(f'custom_call_target="{cpu_decode.TARGET}"')
    assert calls == {"mqa": 0, "mqa_kernel": 2}
