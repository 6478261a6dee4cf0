"""The thunk profile that explains where a compiled step's time goes (benchmarks/xla_profile.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.xla_profile import CATEGORIES, profile_thunks

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="reads the names of XLA's CPU thunks")


def test_a_matmul_dominated_step_is_attributed_to_its_matmuls():
    """A loop of large 2-D matmuls plus a cheap elementwise op: the profile puts most thunk
    time under 2-D matmuls, the batched product under batched, and never exceeds what the
    clock saw (covered time <= wall time, category sums = thunk total)."""
    @jax.jit
    def step(x, w, a, b):
        for _ in range(4):
            x = jnp.tanh(x @ w)
        return x, jnp.einsum("bij,bjk->bik", a, b)

    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal((512, 512)), jnp.float32) for _ in range(2))
    a, b = (jnp.asarray(rng.standard_normal((4, 64, 64)), jnp.float32) for _ in range(2))
    hlo = step.lower(x, w, a, b).compile().as_text()
    run = lambda: jax.block_until_ready(step(x, w, a, b))  # noqa: E731
    run()
    result = profile_thunks(run, hlo, repeats=3)
    assert set(result["by_category"]) == set(CATEGORIES)
    assert abs(sum(result["by_category"].values()) - result["thunk_ms"]) < 1e-6
    assert 0 < result["covered_ms"] <= result["wall_ms"] * 1.01
    assert result["by_category"]["matmul 2-D"] > 0.5 * result["thunk_ms"]
    assert result["by_category"]["matmul batched"] > 0
    # the instructions, slowest first, each in its category (which single one is slowest is
    # a race under load: a 512^2 tanh can outlast one matmul when the other core is busy)
    top = result["top"]
    assert [t["ms"] for t in top] == sorted((t["ms"] for t in top), reverse=True)
    assert sum(t["category"] == "matmul 2-D" for t in top) >= 4  # the loop's four matmuls
    for category in CATEGORIES:
        assert sum(t["ms"] for t in top if t["category"] == category) <= result["by_category"][category] + 1e-6
