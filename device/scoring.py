"""Scoring a model's answers against the true labels: accuracy, macro-F1, per-label scores, confusion.

Pure Python and numpy, no TensorFlow and no training code: training, conversion's
float/int8 gate and ``nebula evaluate`` (which runs on a Pi for a .tflite) all score
with these functions.
"""

from __future__ import annotations

import numpy as np


def score(true_labels: list[str], predicted_labels: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 over the labels present in `true_labels`, per-label P/R/F1/support, confusion.

    `labels` are the model's labels; a true label the model does not know still counts
    (it can only be wrong). `confusion` has one row per true label present and one
    column per label: {true: {predicted: count}}.
    """
    if len(true_labels) != len(predicted_labels):
        raise ValueError(f"{len(true_labels)} true labels but {len(predicted_labels)} predictions")
    known = list(labels) + sorted(set(true_labels) - set(labels))
    columns = known + sorted(set(predicted_labels) - set(known))
    counts = {t: {p: 0 for p in columns} for t in known}
    for t, p in zip(true_labels, predicted_labels):
        counts[t][p] += 1
    per_class = {}
    for label in known:
        tp = counts[label][label]
        support = sum(counts[label].values())
        predicted = sum(row[label] for row in counts.values())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    present = [label for label in known if per_class[label]["support"]]
    correct = sum(t == p for t, p in zip(true_labels, predicted_labels))
    return {
        "accuracy": correct / len(true_labels) if true_labels else 0.0,
        "macro_f1": float(np.mean([per_class[label]["f1"] for label in present])) if present else 0.0,
        "per_class": per_class,
        "confusion": {t: counts[t] for t in present},
    }


def format_scores(scores: dict) -> str:
    """The table a person reads: accuracy, macro-F1, then precision/recall/F1/support per label."""
    lines = [
        f"accuracy {scores['accuracy']:.3f}   macro-F1 {scores['macro_f1']:.3f} (over the {len(scores['confusion'])} labels present)",
        f"{'label':20}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}",
    ]
    for label, s in scores["per_class"].items():
        if s["support"] or s["precision"]:
            lines.append(f"{label:20}{s['precision']:>10.3f}{s['recall']:>10.3f}{s['f1']:>10.3f}{s['support']:>9}")
    return "\n".join(lines)


def format_confusion(scores: dict) -> str:
    """The confusion matrix as text: rows are true labels, columns predicted labels."""
    confusion = scores["confusion"]
    if not confusion:
        return ""
    columns = list(next(iter(confusion.values())))
    width = max(6, *(len(c) for c in columns)) + 1
    lines = ["true \\ predicted".ljust(20) + "".join(c[:width - 1].rjust(width) for c in columns)]
    for true, row in confusion.items():
        lines.append(true[:19].ljust(20) + "".join(str(row[c]).rjust(width) for c in columns))
    return "\n".join(lines)
