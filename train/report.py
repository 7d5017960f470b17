"""The report a person reads: confusion matrix, training curves, and the worst mistakes with their images.

    confusion_png(scores, path)        rows: true label, columns: predicted; counts and row-normalised colour
    curves_png(history, path)          loss and validation accuracy / macro-F1 per epoch, one panel per phase
    mistakes_html(evaluation, path)    the most confident wrong answers, with the images the model saw

matplotlib is imported inside the functions (Agg backend, no display needed).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from nebula.device.decode import ImageError, load_image
from nebula.device.preprocess import prepare


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_png(scores: dict, path: str | Path, title: str = "Confusion matrix") -> Path:
    plt = pyplot()
    confusion = scores["confusion"]
    rows = list(confusion)
    columns = list(next(iter(confusion.values()))) if rows else []
    counts = np.array([[confusion[r][c] for c in columns] for r in rows], dtype=float).reshape(len(rows), len(columns))
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 3, 0.8 * len(rows) + 2.5))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            ax.text(j, i, int(counts[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right")
    ax.set_yticks(range(len(rows)), [f"{r} ({int(counts[i].sum())})" for i, r in enumerate(rows)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (support)")
    ax.set_title(f"{title}: accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def curves_png(history: dict[str, list[dict]], path: str | Path) -> Path:
    """`history` maps a phase name to its epochs: [{"epoch", "loss", "val_accuracy", "val_macro_f1"}, ...]."""
    plt = pyplot()
    phases = [name for name, epochs in history.items() if epochs]
    fig, axes = plt.subplots(1, max(1, len(phases)), figsize=(6 * max(1, len(phases)), 4), squeeze=False)
    for ax, name in zip(axes[0], phases):
        epochs = history[name]
        x = [e["epoch"] for e in epochs]
        ax.plot(x, [e["loss"] for e in epochs], label="training loss", color="tab:gray")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        right = ax.twinx()
        right.plot(x, [e["val_accuracy"] for e in epochs], label="val accuracy", color="tab:blue")
        right.plot(x, [e["val_macro_f1"] for e in epochs], label="val macro-F1", color="tab:orange")
        right.set_ylim(0, 1.02)
        right.set_ylabel("validation score")
        best = max(epochs, key=lambda e: e["val_macro_f1"])
        right.axvline(best["epoch"], color="tab:orange", linestyle=":", linewidth=1, label=f"kept: epoch {best['epoch']}")
        ax.xaxis.get_major_locator().set_params(integer=True)
        lines = ax.get_lines() + right.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def worst_mistakes(evaluation, limit: int = 24) -> list[int]:
    """Indices of wrong answers, most confident first."""
    predicted = evaluation.probabilities.argmax(1) if len(evaluation.probabilities) else np.array([], int)
    wrong = [i for i, p in enumerate(predicted) if evaluation.labels[p] != evaluation.true_labels[i]]
    return sorted(wrong, key=lambda i: -float(evaluation.probabilities[i].max()))[:limit]


def _thumbnail_uri(path: Path, spec) -> str:
    try:
        image = Image.fromarray(prepare(load_image(path, spec), spec))
    except ImageError:
        image = Image.new("RGB", (spec.input_size, spec.input_size), (90, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def mistakes_html(evaluation, path: str | Path, title: str = "Worst mistakes", limit: int = 24) -> Path:
    """A self-contained HTML page: each mistake's image (as the model saw it), truth, answer and top-3."""
    cards = []
    for i in worst_mistakes(evaluation, limit):
        probs = evaluation.probabilities[i]
        top = np.argsort(probs)[::-1][:3]
        ranked = "<br>".join(f"{html.escape(evaluation.labels[j])} {probs[j]:.2f}" for j in top)
        cards.append(
            f'<figure><img src="{_thumbnail_uri(evaluation.paths[i], evaluation.spec)}" width="224" height="224">'
            f"<figcaption><b>true:</b> {html.escape(evaluation.true_labels[i])}<br>"
            f"<b>answer:</b> {html.escape(evaluation.labels[top[0]])} ({probs[top[0]]:.2f})<br>"
            f"<small>{ranked}<br>{html.escape(evaluation.paths[i].name)}</small></figcaption></figure>"
        )
    s = evaluation.scores
    body = "\n".join(cards) or "<p>No mistakes.</p>"
    page = f"""<!doctype html>
<meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{background:#111;color:#ddd;font-family:sans-serif}} figure{{display:inline-block;margin:6px;width:224px;vertical-align:top}}
img{{image-rendering:pixelated;background:#000}} figcaption{{font-size:13px}}</style>
<h1>{html.escape(title)}</h1>
<p>{len(evaluation.paths)} images, accuracy {s['accuracy']:.3f}, macro-F1 {s['macro_f1']:.3f}.
The {len(cards)} most confident wrong answers, each image shown as the model saw it.</p>
{body}
"""
    Path(path).write_text(page, encoding="utf-8")
    return Path(path)
