"""benchmarks/long_context.py's one-line errors, before any model is loaded."""

import pytest

from benchmarks import long_context


@pytest.mark.parametrize("argv,fragment", [
    (["--model=llama"], "argument --model: invalid choice: 'llama'"),
    (["--model=gemma3", "--batches=0"], "--batches: '0': every value must be at least 1"),
    (["--model=gemma3", "--contexts=2K"], "'2K' is not a comma-separated list of integers"),
    (["--model=smollm2", "--steps=0"], "--steps=0 and --repeats=3 must be at least 1"),
])
def test_bad_arguments_are_one_line_errors(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        long_context.main(argv)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert fragment in stderr.strip().splitlines()[-1] and "Traceback" not in stderr


def test_defaults_follow_the_model():
    args = long_context.parse(["--model=gemma3"])
    assert args.contexts == [2048, 8192, 32_752] and args.workdir.name == "gemma3_270m"
    args = long_context.parse(["--model=smollm2", "--contexts=512"])
    assert args.contexts == [512] and args.workdir.name == "smollm2"
    assert long_context.parse(["--model=smollm2"]).contexts == [2048, 8176]  # + 16 steps: 8,192
