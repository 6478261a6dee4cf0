"""Where a compiled JAX step spends its time on the CPU: XLA's thunks from a profiler trace.

XLA's CPU runtime executes a compiled program as a sequence of thunks, one per HLO
instruction left after fusion (a matmul, a fused elementwise loop, a copy, ...), and
`jax.profiler` records each one with its instruction's name. This module runs a function
under the profiler, reads the trace (Perfetto JSON), and adds the thunks up by what their
instructions compute, read from the compiled HLO text:

- "matmul 2-D": dots whose operands are matrices (projections, MLP, logits; `dense`);
- "matmul batched": dots with batch dimensions (the attention products);
- "copy/transpose": copies, transposes and fusions XLA named after them;
- "scan slicing": dynamic slices and updates (in training, the layer scan reading its
  stacked weights and writing its stacked residuals, and the broadcasts that zero-fill
  those stacks; in decoding, the KV-cache writes);
- "reduction": fusions that reduce (softmax, norms, loss);
- "elementwise": every other fusion.

It also reports how much of the wall time no thunk covered (runtime and Python overhead,
waiting) and the mean number of thunks running at once (XLA runs independent thunks
concurrently, and a matmul thunk may itself use the thread pool).
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
import tempfile
import time
from typing import Callable

import jax

CATEGORIES = ["matmul 2-D", "matmul batched", "elementwise", "copy/transpose", "scan slicing",
              "reduction", "other"]


def _instructions(hlo: str) -> tuple[dict, dict]:
    """{instruction name: (shape, opcode, called computation)}, {computation name: text}."""
    instructions = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%([\w.-]+) = (\S+?)(?:\{[^}]*\})? ([\w-]+)\((.*)", line)
        if match:
            name, shape, op, rest = match.groups()
            calls = re.search(r"calls=%([\w.-]+)", rest)
            instructions[name] = (shape, op, calls.group(1) if calls else None)
    computations = {block.split(" ")[0].lstrip("%"): block
                    for block in re.split(r"\n(?=\S)", hlo)}
    return instructions, computations


def categorize(name: str, instructions: dict, computations: dict) -> str:
    """The category (see the module docstring) of the thunk for instruction `name`."""
    shape, op, calls = instructions[name]
    body = computations.get(calls, "") if calls else ""
    if op == "dot" or " dot(" in body:
        shapes = re.findall(r"= \w+\[([\d,]*)\]\S* dot\(", body) if body else [shape]
        return "matmul batched" if any(s.count(",") >= 2 for s in shapes) else "matmul 2-D"
    if op in ("copy", "transpose") or name.startswith(("copy", "transpose")):
        return "copy/transpose"
    if op in ("dynamic-slice", "dynamic-update-slice") or "dynamic" in name \
            or (op == "broadcast" or "broadcast" in name) and shape.count(",") >= 4:
        return "scan slicing"
    if op == "reduce" or " reduce(" in body or "reduce" in name:
        return "reduction"
    if op == "fusion" or "fusion" in name or name.startswith("wrapped_"):
        return "elementwise"
    return "other"


def profile_thunks(run: Callable[[], object], hlo: str, repeats: int = 3) -> dict:
    """Profiles `repeats` calls of `run` (already compiled and warm) whose compiled program
    is `hlo`. Returns per-call milliseconds: wall, covered (by at least one thunk), thunk
    time by category, mean concurrency, and the 15 costliest instructions."""
    instructions, computations = _instructions(hlo)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        wall = (time.perf_counter() - start) / repeats
        jax.profiler.stop_trace()
        trace = next(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
        events = json.load(gzip.open(trace))["traceEvents"]
    thunks = [e for e in events if e.get("ph") == "X" and e.get("name") in instructions]
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    by_name = collections.Counter()
    for e in thunks:
        by_category[categorize(e["name"], instructions, computations)] += e["dur"] / 1e3 / repeats
        by_name[e["name"]] += e["dur"] / 1e3 / repeats
    covered, begin, end = 0.0, None, None  # the union of the thunks' intervals, in us
    for s, e in sorted((e["ts"], e["ts"] + e["dur"]) for e in thunks):
        if end is None or s > end:
            covered += (end - begin) if end is not None else 0.0
            begin, end = s, e
        else:
            end = max(end, e)
    covered += (end - begin) if end is not None else 0.0
    total = sum(by_category.values())
    top = [dict(instruction=n, ms=ms, shape=instructions[n][0],
                category=categorize(n, instructions, computations))
           for n, ms in by_name.most_common(15)]
    return dict(wall_ms=wall * 1e3, covered_ms=covered / 1e3 / repeats, thunk_ms=total,
                concurrency=total / max(covered / 1e3 / repeats, 1e-9),
                by_category=by_category, top=top)
