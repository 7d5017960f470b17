"""The classifier head fitted as what it is: an L2-regularised multinomial logistic regression.

On pooled backbone features the head (dropout + dense softmax) is a linear model, and its
training problem is convex. Fitted with Adam and stopped early on the validation macro-F1 of
about 70 photographs, it stops wherever that noisy score peaks; fitted here to convergence
(L-BFGS) with an L2 penalty it has one answer for the data, the weights and the penalty, in
seconds. Leave-photographers-out it is within the noise of the Adam head on macro-F1 and loses
on dark-vs-emission (README, "Other photographers"), so it is an option (--head logistic), not
the default.

    kernel, bias = fit(features, labels, sample_weights, n_classes, l2=1e-3)
    classifier.set_weights([kernel, bias])   # a keras Dense(n_classes, activation="softmax")

The features are centred before the fit (the penalty then does not fight an offset) and the
centring is folded into the bias, so the result drops into the Dense layer as it is.
"""

from __future__ import annotations

import numpy as np

from nebula.train.calibrate import softmax

# How nebula train and nebula crossval may fit the head: dense (Adam with early stopping on validation
# macro-F1, fit.py; the default) or logistic (solved here; measured against dense in README).
HEADS = ("dense", "logistic")
DEFAULT_L2 = 1e-3  # the best of 1e-4, 1e-3, 1e-2 on one deal of folds; measured again on another (README)


def loss_and_gradient(theta: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray, n_classes: int, l2: float):
    """Weighted mean cross-entropy + l2 * |kernel|^2 (the bias is not penalised), and its gradient, for flat theta."""
    n, d = x.shape
    kernel, bias = theta[: d * n_classes].reshape(d, n_classes), theta[d * n_classes:]
    probs = softmax(x @ kernel + bias)
    w = w / w.sum()
    loss = -(w * np.log(probs[np.arange(n), y] + 1e-12)).sum() + l2 * (kernel ** 2).sum()
    residual = probs
    residual[np.arange(n), y] -= 1.0
    residual *= w[:, None]
    return loss, np.concatenate([(x.T @ residual + 2 * l2 * kernel).ravel(), residual.sum(axis=0)])


def fit(features: np.ndarray, labels: np.ndarray, sample_weights: np.ndarray | None, n_classes: int,
        l2: float = DEFAULT_L2, max_iterations: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (D, C), bias (C,)) for softmax(features @ kernel + bias), in float32 for a Dense layer."""
    from scipy.optimize import minimize

    x = np.asarray(features, np.float64).reshape(len(features), -1)
    y = np.asarray(labels, np.int64)
    w = np.ones(len(y)) if sample_weights is None else np.asarray(sample_weights, np.float64)
    if len(x) != len(y) or len(y) != len(w) or not len(y):
        raise ValueError(f"linear head: {len(x)} feature rows, {len(y)} labels and {len(w)} weights (need equal, non-zero)")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"linear head: labels must lie in 0..{n_classes - 1}")
    mean = x.mean(axis=0)
    x = x - mean
    d = x.shape[1]
    result = minimize(loss_and_gradient, np.zeros(d * n_classes + n_classes), args=(x, y, w, n_classes, l2), jac=True,
                      method="L-BFGS-B", options={"maxiter": max_iterations})
    kernel, bias = result.x[: d * n_classes].reshape(d, n_classes), result.x[d * n_classes:]
    return kernel.astype(np.float32), (bias - mean @ kernel).astype(np.float32)
