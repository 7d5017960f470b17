"""Does a runtime nobody here wrote read our model file? MediaPipe Tasks' ImageClassifier.

MediaPipe reads only the standard TFLite Metadata (convert/tflite_metadata.py) and the
associated labels.txt: without them it answers with bare indices. It gets a virtual
environment of its own (650 MB with OpenCV, and its pins are not TensorFlow's), which
holds MediaPipe and nothing of ours: the client below is a few lines of MediaPipe's
public API, run by that environment's python.

MediaPipe resizes and normalises by the metadata itself. To compare models and not
resizers, it is given each image already prepared by our `prepare` at the model's
input size (a lossless PNG), so only the normalisation and the labels are its own;
our answer comes from the original file along the path `nebula classify` takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

MEDIAPIPE = ["mediapipe==1.2.2"]
DEFAULT_VENV = Path(".venv-mediapipe")

# Runs in the MediaPipe venv: model path, then PNG paths; one JSON line per image.
_CLIENT = """
import json, sys
import mediapipe as mp
from mediapipe.tasks.python.core.base_options import BaseOptions
from mediapipe.tasks.python.vision.image_classifier import ImageClassifier, ImageClassifierOptions

options = ImageClassifierOptions(base_options=BaseOptions(model_asset_path=sys.argv[1]), max_results=-1)
with ImageClassifier.create_from_options(options) as classifier:
    for path in sys.argv[2:]:
        categories = classifier.classify(mp.Image.create_from_file(path)).classifications[0].categories
        ranked = [[c.category_name, c.index, c.score] for c in categories]
        print(json.dumps({"file": path, "ranked": ranked}), flush=True)
"""


@dataclass
class MediaPipeComparison:
    images: int
    same_top1: int
    ties: list[str] = field(default_factory=list)  # MediaPipe chose another label with exactly our top score
    differences: dict[str, tuple] = field(default_factory=dict)  # file -> ((ours, score), (MediaPipe's, score))
    unnamed: int = 0  # answers without a label name: MediaPipe did not find the labels in the metadata
    largest_score_gap: float = 0.0  # over every image and every label
    errors: dict[str, str] = field(default_factory=dict)  # files our decoder refused; not compared

    @property
    def agrees(self) -> bool:
        return not self.differences and not self.unnamed and self.images > 0


def venv_fingerprint() -> str:
    """What the venv must hold: the requirement pins and the Python that made it."""
    return hashlib.sha256(json.dumps([MEDIAPIPE, sys.version]).encode()).hexdigest()


def ensure_venv(venv: Path = DEFAULT_VENV) -> Path:
    """`venv` with MediaPipe installed, made again when the pins (or Python) changed; returns its absolute python."""
    venv = Path(venv).resolve()
    python = venv / "bin" / "python"
    ready = venv / ".nebula-ready"  # holds the fingerprint of what was installed
    if ready.exists() and python.exists() and ready.read_text().strip() == venv_fingerprint():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *MEDIAPIPE], check=True)
    ready.write_text(venv_fingerprint() + "\n")
    return python


def classify_with_mediapipe(python: Path, model: Path, images: list[Path]) -> dict[str, list]:
    """MediaPipe's ranked [label name, index, score] per image path."""
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    done = subprocess.run([str(python), "-c", _CLIENT, str(model), *map(str, images)],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or len(records) != len(images):
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"MediaPipe could not classify with {model} (exit {done.returncode}): {last}")
    return {record["file"]: record["ranked"] for record in records}


def compare_with_mediapipe(model: Path, images: list[Path], venv: Path = DEFAULT_VENV) -> MediaPipeComparison:
    """Our answers (`nebula classify`'s path: decode_file, classify_decoded) against MediaPipe's on the same prepared images."""
    from nebula.device.classify import classify_decoded, decode_file
    from nebula.device.runtime import Classifier

    model = Path(model).resolve()
    python = ensure_venv(venv)
    classifier = Classifier(model, num_threads=1)
    ours, originals, errors = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="nebula-mediapipe-") as folder:
        for i, path in enumerate(images):
            decoded = decode_file(classifier, Path(path))  # the two halves of `nebula classify`'s path
            if decoded.result is not None:
                errors[str(path)] = decoded.result.error or f"skipped: {decoded.result.skipped}"
                continue
            png = Path(folder) / f"{i:05d}.png"
            Image.fromarray(decoded.image).save(png)
            result = classify_decoded(classifier, decoded, top_k=len(classifier.labels))
            ours[str(png)], originals[str(png)] = result.prediction, str(path)
        theirs = classify_with_mediapipe(python, model, list(map(Path, ours))) if ours else {}
    comparison = MediaPipeComparison(images=len(ours), same_top1=0, errors=errors)
    for png, prediction in ours.items():
        ranked, original = theirs[png], originals[png]
        name, _, score = ranked[0]
        for _, index, their_score in ranked:  # every label's score, not only the winner's
            comparison.largest_score_gap = max(comparison.largest_score_gap, abs(their_score - float(prediction.probabilities[index])))
        if not name:
            comparison.unnamed += 1
        our_scores = dict(prediction.top_k)
        if name == prediction.label:
            comparison.same_top1 += 1
        elif name in our_scores and our_scores[name] == prediction.score and abs(score - prediction.score) < 1e-6:
            comparison.ties.append(original)  # two labels share our top score; MediaPipe broke the tie the other way
        else:
            comparison.differences[original] = ((prediction.label, prediction.score), (name, score))
    return comparison
