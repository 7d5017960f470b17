"""Temperature scaling, and how far a model's probabilities are from frequencies (expected calibration error).

A softmax head trained with class weights on a few hundred photographs is
over-confident, so `--threshold 0.5` would not mean "right half the time".
One temperature T, fitted on validation by likelihood, divides the logits:
softmax(z / T). It is folded into the classifier's weights (W / T, b / T), so
the float model, the int8 model and the device need nothing new.

    t = fit_temperature(val_probs, val_truth)
    ece_before, ece_after = expected_calibration_error(p, y), expected_calibration_error(scale(p, t), y)
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def _log(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax probabilities re-tempered: softmax(log p / T), which equals softmax(z / T) for the logits z."""
    return softmax(_log(probs) / temperature)


def nll(probs: np.ndarray, truth: np.ndarray) -> float:
    return float(-_log(probs)[np.arange(len(truth)), truth].mean())


def fit_temperature(probs: np.ndarray, truth: np.ndarray, low: float = 0.05, high: float = 20.0) -> float:
    """The T that minimises validation negative log-likelihood (golden-section search on log T)."""
    if len(truth) == 0:
        return 1.0
    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    for _ in range(60):
        if nll(scale(probs, np.exp(c)), truth) < nll(scale(probs, np.exp(d)), truth):
            b, d = d, c
            c = b - ratio * (b - a)
        else:
            a, c = c, d
            d = a + ratio * (b - a)
    return float(np.exp((a + b) / 2))


def expected_calibration_error(probs: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by the bin's share of images."""
    if len(truth) == 0:
        return 0.0
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == truth
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for k in range(bins):
        members = which == k
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def fold_into_classifier(dense_layer, temperature: float) -> None:
    """Divide a softmax Dense layer's kernel and bias by T, so its output is the tempered softmax."""
    kernel, bias = dense_layer.get_weights()
    dense_layer.set_weights([kernel / temperature, bias / temperature])
