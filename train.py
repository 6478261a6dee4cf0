"""Train a language model from a config file.

  python train.py --config=configs/mqa.py --workdir=runs/mqa
  python train.py --config=configs/tiny.py --workdir=runs/tiny --config.model.num_kv_heads=1

Running the same command again resumes from the newest checkpoint in the workdir; with no
--config, the workdir's config.json is used. Several hosts: start one process per host with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I.

SIGTERM or Ctrl-C (SIGINT) saves a checkpoint of the step under way and exits with 143 or 130;
a bad command line, config, data or workdir exits with 2, a diverged run (non-finite loss)
with 1, each with one line on stderr (mqa/cli.py).
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mqa import trainer
from mqa.cli import RUN_FAILED, fail, parse_flags
from mqa.config import ConfigError
from mqa.data import DataError
from mqa.workdir import prepare_workdir, saved_config

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Directory for config, checkpoints and metrics.", required=True)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", 1, "Number of processes (hosts) in a multi-host run.")
flags.DEFINE_integer("process_id", 0, "This process's index in a multi-host run.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if FLAGS.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        trainer.train(trainer.config_or_saved(FLAGS.config, FLAGS.workdir), FLAGS.workdir)
    except (ConfigError, DataError) as error:
        fail(str(error))
    except trainer.NonFiniteLoss as error:
        fail(str(error), RUN_FAILED)
    except trainer.Preempted as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_status)
    except KeyboardInterrupt:  # Ctrl-C before the first step, or twice
        print("SIGINT: stopped before a checkpoint could be saved; run the same command to resume "
              "from the last one", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
