"""Evaluate or sample from a trained model.

  python eval.py --workdir=runs/mqa                          # held-out perplexity
  python eval.py --workdir=runs/mqa --text=some.txt --stride=128
  python eval.py --workdir=runs/mqa --sample --prompt="ROMEO:" --max_new_tokens=200

The last line printed by an evaluation is one JSON object with keys
loss, perplexity, bits_per_byte and tokens. Config fields can be overridden as in
train.py (--config.model.attention_impl=xla); a change that does not fit the checkpoint
is reported in one line.

The work is `mqa.evaluation.evaluate` and `mqa.sampling.sample`; this file maps the flags
to their arguments and their errors to one line.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from mqa.cli import fail, parse_flags
from mqa.config import ConfigError, default_config
from mqa.data import DataError
from mqa.evaluation import evaluate
from mqa.loading import CheckpointError
from mqa.sampling import sample

flags.DEFINE_string("workdir", None, "A training workdir, or a checkpoint step directory.",
                    required=True)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_string("text", None, "Evaluate this text file instead of the held-out split.")
flags.DEFINE_integer("seq_len", None, "Window length (default: train.seq_len).")
flags.DEFINE_integer("stride", None, "Sliding-window stride (default: seq_len, no overlap).")
flags.DEFINE_integer("batch_size", 8, "Windows per batch.")
flags.DEFINE_bool("cached", None, "Score through the KV cache as decoding reads it (default: "
                  "exactly when the model has an int8 cache, e.g. "
                  "--config.model.kv_cache_dtype=int8; --nocached: the forward pass).")
flags.DEFINE_bool("progress", True, "Show a progress bar (tokens scored, tokens/s, time left) "
                  "on stderr.")
flags.DEFINE_bool("sample", False, "Generate a continuation of --prompt instead.")
flags.DEFINE_string("prompt", "\n", "Prompt text for --sample.")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens.")
flags.DEFINE_float("top_p", None, "Sample from the smallest set with this probability.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
config_flags.DEFINE_config_dict("config", default_config(), "Overrides of the run's config.")
FLAGS = flags.FLAGS


def config_overrides() -> dict:
    """The --config.section.field flags given on the command line."""
    return {name[len("config."):]: FLAGS[name].value for name in FLAGS
            if name.startswith("config.") and FLAGS[name].present}


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    model = dict(workdir=FLAGS.workdir, step=FLAGS.step, overrides=config_overrides())
    try:
        if FLAGS.sample:
            print(sample(prompt=FLAGS.prompt.encode().decode("unicode_escape"),
                         max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                         top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed, **model))
            return
        print(json.dumps(evaluate(text=FLAGS.text, seq_len=FLAGS.seq_len, stride=FLAGS.stride,
                                  batch_size=FLAGS.batch_size, cached=FLAGS.cached,
                                  progress=FLAGS.progress, **model)))
    except (ConfigError, DataError, CheckpointError, ValueError) as error:
        fail(str(error))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
