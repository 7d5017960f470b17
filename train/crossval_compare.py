"""Is recipe B better than recipe A on other people's photographs, or only within the noise?

    nebula crossval-compare models/crossval/before models/crossval/default

Two `nebula crossval` runs with the same seed, folds and repeats deal the same
photographers into the same folds, so their out-of-fold answers are paired photo
by photo. Two views of the difference B − A:

- per repeat: the same fold deal scored by both recipes (the spread of these
  differences is much smaller than the spread of either recipe over deals);
- a paired bootstrap over photographers: draw the photographers with replacement,
  score both recipes on the same draw, repeat. The interval says how much of the
  difference would survive other photographers than the ones Stellarium happens to
  credit; "B ahead in x %" is the share of draws in which B's macro-F1 is higher.
  Photographers, not photographs, are drawn because one photographer's pictures
  stand or fall together (same gear, same processing).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nebula.train.crossval import CROSSVAL_NAME

PAIRED_KEYS = ("folds", "seed", "repeats")  # config values that must match for the deals to be the same


class CompareError(ValueError):
    """Two crossval runs that cannot be paired; the message is one line saying why."""


def load_record(path: str | Path) -> dict:
    path = Path(path)
    path = path / CROSSVAL_NAME if path.is_dir() else path
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CompareError(f"{path}: cannot read a crossval record ({err})") from None
    if "out_of_fold" not in record:
        raise CompareError(f"{path}: has no out_of_fold answers (written by an older nebula crossval; run it again)")
    return record


def macro_f1_weighted(truth: np.ndarray, predicted: np.ndarray, n_labels: int, weights: np.ndarray) -> np.ndarray:
    """Macro-F1 over the labels present, one value per row of `weights` (how many times each photo is counted).

    The same figure as nebula.device.scoring.score for weights of ones (a test checks it), vectorised over draws.
    """
    true_hot = np.eye(n_labels)[truth]  # (n, L)
    pred_hot = np.eye(n_labels)[predicted]
    tp = weights @ (true_hot * pred_hot)  # (draws, L)
    support, predicted_count = weights @ true_hot, weights @ pred_hot
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(support + predicted_count > 0, 2 * tp / (support + predicted_count), 0.0)
    present = support > 0
    return (f1 * present).sum(1) / present.sum(1)


def compare(a: dict, b: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """The paired difference B − A in macro-F1, per repeat and bootstrapped over photographers."""
    for key in PAIRED_KEYS:
        if a["config"][key] != b["config"][key]:
            raise CompareError(f"the runs differ in {key} ({a['config'][key]} vs {b['config'][key]}): their folds are "
                               "not the same deal, so their answers cannot be paired")
    oof_a, oof_b = a["out_of_fold"], b["out_of_fold"]
    if oof_a["files"] != oof_b["files"] or oof_a["truth"] != oof_b["truth"]:
        raise CompareError("the runs scored different photographs (other datasets?): they cannot be paired")
    labels = list(dict.fromkeys([*a["labels"], *b["labels"]]))
    index = {label: i for i, label in enumerate(labels)}
    truth = np.array([index[t] for t in oof_a["truth"]])
    pred_a = np.array([[index[p] for p in repeat] for repeat in oof_a["predicted"]])
    pred_b = np.array([[index[p] for p in repeat] for repeat in oof_b["predicted"]])
    ones = np.ones((1, len(truth)))

    def per_repeat(pred):
        return np.array([macro_f1_weighted(truth, p, len(labels), ones)[0] for p in pred])

    f1_a, f1_b = per_repeat(pred_a), per_repeat(pred_b)

    # Draw photographers with replacement; each photo counts as often as its photographer was drawn.
    names = sorted(set(oof_a["photographers"]))
    photo_owner = np.array([names.index(n) for n in oof_a["photographers"]])
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(names), size=(resamples, len(names)))
    weights = np.stack([np.bincount(d, minlength=len(names)) for d in drawn])[:, photo_owner].astype(float)
    boot_a = np.mean([macro_f1_weighted(truth, p, len(labels), weights) for p in pred_a], axis=0)
    boot_b = np.mean([macro_f1_weighted(truth, p, len(labels), weights) for p in pred_b], axis=0)
    diff = boot_b - boot_a

    return {
        "a": a["config"], "b": b["config"], "photographs": len(truth), "photographers": len(names),
        "macro_f1": {"a": f1_a.tolist(), "b": f1_b.tolist(), "difference_per_repeat": (f1_b - f1_a).tolist(),
                     "difference_mean": float(np.mean(f1_b - f1_a))},
        "bootstrap": {"resamples": resamples, "seed": seed, "difference_mean": float(diff.mean()),
                      "interval_95": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))],
                      "b_ahead": float(np.mean(diff > 0))},
    }


def summary(result: dict, name_a: str, name_b: str) -> str:
    m, boot = result["macro_f1"], result["bootstrap"]
    per_repeat = "  ".join(f"{d:+.3f}" for d in m["difference_per_repeat"])
    low, high = boot["interval_95"]
    return "\n".join([
        f"A = {name_a}, B = {name_b}: {result['photographs']} photographs by {result['photographers']} photographers, "
        f"the same {len(m['a'])} fold deal(s)",
        f"macro-F1 per repeat   A {'  '.join(f'{v:.3f}' for v in m['a'])}   B {'  '.join(f'{v:.3f}' for v in m['b'])}",
        f"B - A per repeat      {per_repeat}   (mean {m['difference_mean']:+.3f})",
        f"bootstrap over photographers ({boot['resamples']} draws): B - A {boot['difference_mean']:+.3f}, "
        f"95% interval [{low:+.3f}, {high:+.3f}], B ahead in {100 * boot['b_ahead']:.1f}% of draws",
    ])
