"""python -m mqa.data prepare --config=configs/NAME.py --workdir=DIR [--config.data.path=...]

Tokenizes the corpus a config names into token files ahead of training, as train.py would on first
use (WORKDIR/data/tokens-*/, or data.token_dir). Running it again after an interruption resumes
from the shards already written; on a complete folder it only reports what is there. A bad command
line, config or data exits with status 2 and one line on stderr (mqa/cli.py).
"""

import time

from absl import app, flags, logging
from ml_collections import config_flags

from mqa import train_data, trainer  # imports JAX
from mqa.workdir import prepare_workdir
from mqa.cli import fail, parse_flags
from mqa.config import ConfigError, validate
from mqa.data import DataError

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "The run's workdir; token files go to WORKDIR/data or data.token_dir.",
                    required=True)


def main(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # `datasets` logs "JAX version ... available" at INFO
    if argv[1:] != ["prepare"]:
        fail(f"usage: python -m mqa.data prepare --config=CONFIG --workdir=DIR; got {' '.join(argv[1:]) or 'no command'}")
    try:
        config = validate(trainer.config_or_saved(flags.FLAGS.config, flags.FLAGS.workdir))
        start = time.monotonic()
        corpus = train_data.load_run_corpus(config, prepare_workdir(flags.FLAGS.workdir))
    except (ConfigError, DataError) as error:
        fail(str(error))
    print(f"data: {corpus.source}; {len(corpus.train):,} train / {len(corpus.heldout):,} held-out tokens "
          f"({corpus.tokenizer.name} tokens, vocabulary {corpus.tokenizer.vocab_size:,}) ready in "
          f"{time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
