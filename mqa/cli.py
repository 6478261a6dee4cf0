"""What the command lines (train.py, eval.py, sweep.py, python -m mqa.analysis) share:
one-line errors instead of tracebacks, and one exit status for every refusal:

  0  done    2  refused (a bad flag, config, data, checkpoint or other input; one line on stderr)
  130  interrupted (SIGINT), 143  terminated (SIGTERM), after saving a checkpoint (train.py)
"""

from __future__ import annotations

import os
import sys

from absl import flags


def fail(message: str) -> None:
    """Prints one error line and exits at once: a failed checkpoint read can leave orbax
    reads pending, whose complaints at interpreter shutdown would bury the message."""
    print(f"error: {' '.join(message.split())}", file=sys.__stderr__, flush=True)
    os._exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser (pass as `app.run(main, flags_parser=parse_flags)`), with a missing
    config file or a bad --config override reported in one line, not a traceback."""
    for arg in argv[1:]:
        if arg.startswith("--config=") and not os.path.isfile(arg.split("=", 1)[1]):
            fail(f"config file {arg.split('=', 1)[1]!r} does not exist")
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        while error.args and isinstance(error.args[0], BaseException):
            error = error.args[0]  # config_flags wraps the KeyError of an unknown field
        message = str(error.args[0]) if error.args else str(error)
        words = " ".join(message.replace("'", "").split())
        culprit = next((arg for arg in argv[1:] if words and words.split()[0] in arg), None)
        words = words.replace(" Did you mean", "; did you mean")
        where = f" in {culprit}" if culprit and culprit not in words else ""
        fail(f"invalid command line{where}: {words}")
