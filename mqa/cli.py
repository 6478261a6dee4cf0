"""What the command-line tools share: one-line errors instead of tracebacks, and exit statuses.

Exit statuses:
  0    done
  1    the run failed on its own (e.g. its loss stopped being finite)
  2    usage: a bad command line, config, data or workdir (one line naming the value)
  130  stopped by SIGINT (Ctrl-C); 143 by SIGTERM: 128 + the signal, as a shell reports it
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from absl import flags

USAGE_ERROR = 2
RUN_FAILED = 1


def fail(message: str, status: int = USAGE_ERROR) -> None:
    """Prints one error line and exits at once with `status`: a failed checkpoint read can leave
    orbax reads pending, whose complaints at interpreter shutdown would bury the message."""
    print(f"error: {' '.join(message.split())}", file=sys.__stderr__, flush=True)
    os._exit(status)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser (pass as `app.run(main, flags_parser=parse_flags)`), with a missing
    config file or a bad --config override reported in one line (exit status 2), not a traceback."""
    for arg in argv[1:]:
        if arg.startswith("--config=") and not os.path.isfile(arg.split("=", 1)[1]):
            _usage_error(f"config file {arg.split('=', 1)[1]!r} does not exist")
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
        _usage_error(f"invalid command line{where}: {words}")


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


class ArgumentParser(argparse.ArgumentParser):
    """argparse (its subcommands' parsers too), with a usage error in one line on the real
    stderr and status 2, instead of the usage text and the error on two."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.__stderr__, flush=True)
        raise SystemExit(USAGE_ERROR)
