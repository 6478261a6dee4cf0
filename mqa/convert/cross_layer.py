"""Cross-layer K/V sharing retrofitted (`mqa.convert uptrain --kv_share_every S`): a model
whose every layer computes keys and values becomes one (Brandon et al. 2024) in which each
group of S consecutive layers attends to the K/V of its first layer.

The group's one K/V projection must serve all S layers from the first layer's input X_0:
  - `--init first`: the first layer's own projection (the others' are dropped);
  - `--init mean`: the mean of the S layers' projections;
  - `--init aligned`: the least-squares fit to calibration activations
    W = argmin_W sum_l |X_0 W - X_l W_l|^2 over the group's layers l (X_l each layer's
    attention input, `mqa.convert.calibration`; keys before RoPE, which rotates both sides
    alike), i.e. X_0 W fitted to the mean of the group's keys (and values), with a small
    ridge (`RIDGE`) for inputs that span fewer than d_model directions.
Every other parameter of layer l moves unchanged to where the shared layout keeps it
(`Transformer`: the group's first layer in `blocks`, the others in `shared_blocks`).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from mqa.convert.errors import ConvertError
from mqa.model_config import ModelConfig

KV_NAMES = ("blocks.attention.k", "blocks.attention.v")
# The fit's ridge, relative to the mean eigenvalue of X_0^T X_0: a layer's input can span
# fewer than d_model directions (the first layer's is one embedding per distinct token).
RIDGE = 1e-4


def shared_kv(kernel: np.ndarray, share_every: int, init: str,
              inputs: np.ndarray | None = None) -> np.ndarray:
    """A K or V projection [num_layers, m, kv, d] -> [num_layers / share_every, m, kv, d]:
    one per group of layers, by `init` ("first", "mean" or "aligned", which needs the
    attention inputs [num_layers, n, m])."""
    layers, m, kv, d = kernel.shape
    fitted = []
    for first in range(0, layers, share_every):
        group = kernel[first:first + share_every]
        if init == "first":
            fitted.append(group[0])
        elif init == "mean":
            fitted.append(group.astype(np.float64).mean(axis=0).astype(kernel.dtype))
        else:
            x0 = inputs[first].astype(np.float64)
            targets = np.mean([inputs[first + j].astype(np.float64) @ group[j].reshape(m, kv * d)
                               for j in range(share_every)], axis=0)
            gram = x0.T @ x0
            gram[np.diag_indices(m)] += RIDGE * np.trace(gram) / m
            solution = scipy.linalg.solve(gram, x0.T @ targets, assume_a="pos")
            fitted.append(solution.reshape(m, kv, d).astype(kernel.dtype))
    return np.stack(fitted)


HOW = {"first": "the first layer's", "mean": "the layers' mean",
       "aligned": "a least-squares fit on calibration text"}


def check_sharing(config: ModelConfig, share_every: int, init: str) -> None:
    """One-line ConvertErrors for a sharing the source cannot be converted to."""
    if config.kv_share_every != 1:
        raise ConvertError(f"--kv_share_every: the source already shares K/V across layers "
                           f"(model.kv_share_every={config.kv_share_every}); convert from one that does not")
    if init == "random":
        raise ConvertError("--kv_share_every takes --init first, mean or aligned, not random")
    layers = config.num_layers
    if share_every < 2 or layers % share_every:
        valid = [s for s in range(2, layers + 1) if layers % s == 0]
        raise ConvertError(f"--kv_share_every {share_every} must be >= 2 and divide the source's "
                           f"model.num_layers={layers}; valid: {', '.join(map(str, valid))}")


def share_layers(arrays: dict[str, np.ndarray], config: ModelConfig, share_every: int,
                 init: str, inputs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A model's parameters (`workdir.params_by_name`, every layer owning its K/V) in the
    layout of the same model with `kv_share_every=share_every`: K/V by `shared_kv`, layer
    g*S's other parameters in blocks[g] and layer g*S+j's (j >= 1) in
    shared_blocks[g*(S-1)+j-1]."""
    layers = config.num_layers
    owners = np.arange(0, layers, share_every)
    others = np.array([l for l in range(layers) if l % share_every])
    result = {}
    for name, array in arrays.items():
        if name in KV_NAMES:
            result[name] = shared_kv(array, share_every, init, inputs)
        elif name.startswith("blocks."):
            result[name] = array[owners]
            result["shared_" + name] = array[others]
        else:
            result[name] = array
    return result
