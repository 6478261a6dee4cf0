"""Sweeps: one training run per point of a grid of config values, compared over seeds.

  points.py   the sweep field and --sweep values expanded into points (`points`), the
              baseline and the compared pairs among their configurations
  run.py      `run_sweep`: every point trained, timed and tabulated (what sweep.py runs)
  speeds.py   every configuration's train step and decoding timed side by side
  tuning.py   per-configuration tuning of one field on tuning seeds and the held-out
              split's tuning half, reporting on its test half
  results.py  each point's result.json, and the tables over points and seeds
  family.py   the comparisons tested (against the baseline, and the contrasts) as one
              family, Holm-adjusted together
  plots.py    the figures

Import the modules themselves (`from mqa.sweep.run import run_sweep`): this file imports
nothing, so that reading a plan (`mqa.sweep.points`) does not load the trainer.
"""
