"""python -m mqa.data prepare --config=configs/NAME.py --workdir=DIR [--config.data.path=...]

Tokenizes the corpus a config names into token files ahead of training, as train.py would on first
use (WORKDIR/data/tokens-*/, or data.token_dir). Running it again after an interruption resumes
from the shards already written; on a complete folder it only reports what is there.
"""

import time

from absl import app, flags
from ml_collections import config_flags

from mqa.cli import fail, parse_flags
from mqa.config import ConfigError, validate
from mqa.data import DataError, load_corpus
from mqa.workdir import data_config, prepare_workdir, saved_config  # imports JAX

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "The run's workdir; token files go to WORKDIR/data or data.token_dir.",
                    required=True)


def main(argv: list[str]) -> None:
    if argv[1:] != ["prepare"]:
        fail(f"usage: python -m mqa.data prepare --config=CONFIG --workdir=DIR; got {' '.join(argv[1:]) or 'no command'}")
    try:
        workdir = prepare_workdir(flags.FLAGS.workdir)
        config = flags.FLAGS.config or saved_config(workdir)
        if config is None:
            raise ConfigError(f"no --config given and {str(workdir / 'config.json')!r} does not exist; "
                              "pass --config=configs/NAME.py")
        validate(config)
        start = time.monotonic()
        corpus = load_corpus(data_config(config), workdir / "data", min_tokens=config.train.seq_len + 1)
    except (ConfigError, DataError) as error:
        fail(str(error))
    print(f"data: {corpus.source}; {len(corpus.train):,} train / {len(corpus.heldout):,} held-out tokens "
          f"({corpus.tokenizer.name} tokens, vocabulary {corpus.tokenizer.vocab_size:,}) ready in "
          f"{time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
