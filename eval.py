"""Evaluate or sample from a trained model.

  python eval.py --workdir=runs/mqa                          # held-out perplexity
  python eval.py --workdir=runs/mqa --text=some.txt --stride=128
  python eval.py --workdir=runs/mqa --sample --prompt="ROMEO:" --max_new_tokens=200

The last line printed by an evaluation is one JSON object with keys
loss, perplexity, bits_per_byte and tokens. Config fields can be overridden as in
train.py (--config.model.attention_impl=xla); a change that does not fit the checkpoint
is reported in one line.
"""

import json
import pathlib
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from mqa import data, decode, evaluation
from mqa.cli import fail, parse_flags
from mqa.config import ConfigError, default_config
from mqa.data import DataError
from mqa.loading import load_model
from mqa.workdir import CheckpointError

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
    try:
        model = load_model(FLAGS.workdir, step=FLAGS.step, overrides=config_overrides())
        if model.tokenizer is None and (FLAGS.sample or FLAGS.text):
            raise DataError(f"{model.path} has no tokenizer.json, so text cannot be encoded; "
                            "copy the model's tokenizer.json there")
        if FLAGS.sample:
            prompt = model.tokenizer.encode(FLAGS.prompt.encode().decode("unicode_escape"))
            out = decode.generate(model, prompt, FLAGS.max_new_tokens,
                                  temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                  top_p=FLAGS.top_p, seed=FLAGS.seed)
            print(model.tokenizer.decode(out[0]))
            return
        seq_len = FLAGS.seq_len or model.config.train.seq_len
        if seq_len > model.model_config.max_seq_len:
            raise ConfigError(f"--seq_len={seq_len} exceeds model.max_seq_len="
                              f"{model.model_config.max_seq_len}")
        if FLAGS.text:
            path = pathlib.Path(FLAGS.text)
            if not path.is_file():
                raise DataError(f"--text file {FLAGS.text!r} does not exist")
            raw = path.read_bytes()
            tokens = model.tokenizer.encode(raw if model.tokenizer.name == "byte"
                                            else raw.decode("utf-8"))
            bytes_per_token, source = len(raw) / max(len(tokens), 1), str(path)
        else:
            data_config = model.config.data
            builtin = data_config.tokenizer in data.TOKENIZER_NAMES
            if model.tokenizer is None or builtin and model.tokenizer.name != data_config.tokenizer:
                raise DataError(
                    f"the held-out split is tokenized with data.tokenizer="
                    f"{data_config.tokenizer!r}, which is not this model's tokenizer "
                    f"({getattr(model.tokenizer, 'name', None)!r}); evaluate with --text=FILE")
            if not builtin:  # a pretrained tokenizer: the run saved it in its workdir
                data_config = ml_collections.ConfigDict({**data_config.to_dict(),
                                                         "tokenizer": str(model.path)})
            corpus = data.load_corpus(data_config, model.path / "data", min_tokens=seq_len + 1)
            tokens, source = corpus.heldout, f"held-out split of {corpus.source}"
            bytes_per_token = corpus.heldout_bytes / len(corpus.heldout)
        print(f"evaluating step {model.step} of {model.path} on {source} "
              f"({len(tokens):,} tokens, windows of {seq_len}"
              f"{f', stride {FLAGS.stride}' if FLAGS.stride else ''})", file=sys.__stderr__)
        result = evaluation.evaluate_tokens(
            model, tokens, seq_len=seq_len, stride=FLAGS.stride, batch_size=FLAGS.batch_size,
            bytes_per_token=bytes_per_token, progress=sys.stderr.isatty(), cached=FLAGS.cached)
        print(json.dumps(result))
    except (ConfigError, DataError, CheckpointError, ValueError) as error:
        fail(str(error))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
