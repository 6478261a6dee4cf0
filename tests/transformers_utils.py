"""Helpers for the tests that compare against `transformers` (torch imported lazily)."""

import numpy as np


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """A transformers causal LM's float32 logits [batch, seq, vocab] for int tokens [batch, seq]."""
    import torch
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|, in float64."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())
