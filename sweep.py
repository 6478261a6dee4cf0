"""Train one model per point of a sweep (e.g. over model.num_kv_heads and seeds) and
tabulate them with error bars.

  python sweep.py --config=configs/sweep_kv_heads.py --workdir=runs/kv_sweep --seeds=4
  python sweep.py --config=configs/tiny.py --workdir=runs/tiny_sweep \
      --sweep=model.num_kv_heads=2,1 --seeds=3 --baseline=model.num_kv_heads=2
  python sweep.py --config=configs/sweep_kv_heads.py --workdir=runs/kv_lr \
      --tune=train.learning_rate=1e-3,2e-3,4e-3

The config's `sweep` field (or the --sweep flags, which replace it) lists the values of
each field; the points are their cartesian product, with train.seed = 0..N-1 as one more
field under --seeds=N. A point without its seed is a *configuration*. Every --config.*
override applies to every point. Each point is an ordinary resumable training run in
WORKDIR/<point name> (e.g. WORKDIR/num_kv_heads=8__seed=0), trained in this process one
after another, seed 0 of every configuration first, so that an interrupted sweep leaves
complete seed pairs; running the same command again skips finished points and resumes an
interrupted one; --only=NAME,NAME,... takes just those configurations, in that order
(their tuning runs, points and contrasts; its tables cover them alone, corrected over
their comparisons). Then every configuration's train step and decoding (--decode_batch
sequences at --decode_context tokens) are timed side by side in alternating rounds, and
the sweep writes:

  WORKDIR/results.csv, results.md   a row per configuration: held-out loss and bits per
                                    byte as mean, sd and 95% interval over seeds, and the
                                    seed-paired difference against --baseline with its
                                    interval, paired t-test p, and p Holm-adjusted over all
                                    the sweep's comparisons (resolved: below 0.05; columns:
                                    mqa/sweep/results.py)
  WORKDIR/results_by_seed.csv       a row per point (configuration and seed)
  WORKDIR/comparisons.csv           for the config's sweep.contrasts and --compare=A:B, the
                                    seed-paired difference A - B with its p and Holm p,
                                    and A's KV-cache and decoding-speed ratios to B
  WORKDIR/tuning.csv, tuning.png    with --tune (or sweep.tune), every tuning run's loss on
                                    the held-out split's tuning half; each configuration
                                    reports at its best value, on the test half
  WORKDIR/speeds.json               the side-by-side timings, per configuration
  WORKDIR/eval_loss.png             held-out loss (mean, 95% interval) against num_kv_heads
                                    (or the first field); eval_loss_diff.png the paired
                                    difference against the baseline
  WORKDIR/decode_tokens_per_sec.png decoding tokens/s against the same field
  WORKDIR/loss_curves.png           train and held-out loss against step, all points

The work is `mqa.sweep.run.run_sweep`; this file maps the flags to its arguments and its
errors to one line.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mqa import trainer
from mqa.cli import fail, parse_flags
from mqa.config import ConfigError
from mqa.data import DataError
from mqa.loading import CheckpointError
from mqa.sweep.run import run_sweep
from mqa.sweep.speeds import DECODE_STEPS

config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/sweep_*.py), or "
                                "any training config together with --sweep.")
flags.DEFINE_string("workdir", None, "Directory for the sweep: one sub-workdir per point.",
                    required=True)
flags.DEFINE_multi_string("sweep", [], "FIELD=V1,V2,... (repeat for more fields); replaces the "
                          "config's sweep field, e.g. --sweep=model.num_kv_heads=8,4,2,1")
flags.DEFINE_integer("seeds", None, "Train every configuration with train.seed = 0..N-1 and "
                     "report means, intervals and seed-paired differences.")
flags.DEFINE_multi_string("baseline", [], "FIELD=VALUE (repeat for more fields): the "
                          "configuration the others are compared with; default: the first.")
flags.DEFINE_multi_string("compare", [], "CONFIGURATION:AGAINST (repeatable), e.g. "
                          "--compare=GTA-2:GQA-2: also report that seed-paired difference "
                          "(comparisons.csv and results.md), added to the contrasts the "
                          "config declares (sweep.contrasts) in one Holm-corrected family.")
flags.DEFINE_string("tune", None, "FIELD=V1,V2,...: train each configuration at every value "
                    "on tuning seeds (1000, 1001, ...), choose the lowest loss on the held-out "
                    "split's tuning half, and report the reporting seeds at that value on its "
                    "test half; replaces the config's sweep.tune. E.g. "
                    "--tune=train.learning_rate=1e-3,2e-3,4e-3")
flags.DEFINE_integer("tune_seeds", None, "Tuning seeds per configuration and value (default: "
                     "the config's sweep.tune_seeds, else 1).")
flags.DEFINE_list("only", [], "NAME,NAME,...: tune, train and report only these "
                  "configurations of the sweep, in this order, and the contrasts among them "
                  "(e.g. to continue a long sweep with the arms that matter first; the full "
                  "command brings back the full tables).")
flags.DEFINE_integer("decode_context", None, "Tokens in the KV cache while timing decoding "
                     "and counting KV bytes (default: the trained context, train.seq_len; "
                     f"capped at model.max_seq_len - {DECODE_STEPS}).", lower_bound=1)
flags.DEFINE_integer("decode_batch", 8, "Sequences decoded at once while timing.", lower_bound=1)
flags.DEFINE_bool("decode_kernel", False, "Also time decoding through the C++ kernel "
                  "(model.decode_impl=cpu_kernel), in the same rounds: a "
                  "decode_kernel_tokens_per_sec column. Needs a C++ compiler.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        if FLAGS.config is None:
            raise ConfigError("pass --config=configs/NAME.py, e.g. configs/sweep_kv_heads.py")
        table = run_sweep(FLAGS.config, FLAGS.workdir, sweep=FLAGS.sweep, seeds=FLAGS.seeds,
                          baseline=FLAGS.baseline, compare=FLAGS.compare,
                          tune=FLAGS.tune, tune_seeds=FLAGS.tune_seeds,
                          decode_context=FLAGS.decode_context, decode_batch=FLAGS.decode_batch,
                          decode_kernel=FLAGS.decode_kernel, only=FLAGS.only)
    except (ConfigError, DataError, CheckpointError, trainer.NonFiniteLoss) as error:
        fail(str(error))
    except trainer.Preempted as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_status)
    print("\n" + table)
    written = ["results.csv", "results.md", "results_by_seed.csv", "comparisons.csv",
               "tuning.csv", "tuning.png", "eval_loss.png", "eval_loss_diff.png",
               "decode_tokens_per_sec.png", "loss_curves.png", "frontier.png",
               "frontier_decode.png", "frontier_decode_kernel.png"]
    written = [name for name in written if os.path.exists(os.path.join(FLAGS.workdir, name))]
    print(f"wrote {FLAGS.workdir}/{', '.join(written[:-1])} and {written[-1]}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
