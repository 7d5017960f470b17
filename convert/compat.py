"""Does a model give the same answers on tflite-runtime 2.14.0 as on LiteRT?

tflite-runtime 2.14.0 is the last release of the older runtime, and many 64-bit
Raspberry Pi OS Bookworm setups still have it. It needs numpy<2 although its
metadata does not say so, so it gets a virtual environment of its own, holding
only the device code (`pip install --no-deps`), never TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

OLD_RUNTIME = ["tflite-runtime==2.14.0", "numpy<2", "pillow", "click"]
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Run the other environment's python outside the repo: there, the repo's own nebula/
# folder would shadow the installed package (which maps device/ into nebula.device).
_OUTSIDE_REPO = tempfile.gettempdir()


def project_fingerprint(project: Path = PROJECT_ROOT) -> str:
    """sha256 of everything the other environment runs from the project: pyproject.toml and the device-side code."""
    digest = hashlib.sha256()
    files = [project / "pyproject.toml"] + sorted(
        f for folder in ("nebula", "device") for f in (project / folder).rglob("*") if f.is_file() and "__pycache__" not in f.parts
    )
    for path in files:
        digest.update(str(path.relative_to(project)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def ensure_venv(venv: Path, project: Path = PROJECT_ROOT) -> Path:
    """`venv` with tflite-runtime 2.14 and the project's current device code; returns its (absolute) python.

    The runtime is installed once. The project is a copy (pip --no-deps), so it is
    installed again whenever the code differs from what the venv holds: a stale copy
    would test old code against the new model.
    """
    venv = Path(venv).resolve()
    python = venv / "bin" / "python"
    ready = venv / ".nebula-ready"  # holds the fingerprint of the installed project copy
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if not ready.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(pip + OLD_RUNTIME, check=True)
        ready.write_text("")
    fingerprint = project_fingerprint(project)
    if ready.read_text().strip() != fingerprint:
        subprocess.run(pip + ["--no-deps", "--force-reinstall", str(project)], check=True)
        ready.write_text(fingerprint + "\n")
    return python


def classify_with(python: Path, model: Path, images: list[Path]) -> dict[str, tuple[str, float]]:
    """(top-1 label, score) per image, classified by the `nebula` of another environment."""
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    result = subprocess.run(
        [str(python), "-m", "nebula", "classify", "--model", str(model), "--format", "jsonl", *map(str, images)],
        capture_output=True, text=True, env=env, cwd=_OUTSIDE_REPO,
    )
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or len(records) != len(images):
        raise RuntimeError(f"{python}: classify failed (exit {result.returncode}): {result.stderr.strip()[-500:]}")
    return {str(Path(r["file"]).resolve()): (r["label"], r["score"]) for r in records}


def backend_of(python: Path) -> str:
    code = "from nebula.device.runtime import load_interpreter_class as f; print(f()[1])"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True, cwd=_OUTSIDE_REPO).stdout.strip()


def compare_runtimes(model: Path, images: list[Path], venv: Path) -> dict:
    """Top-1 answers of this environment's runtime and of tflite-runtime 2.14, side by side."""
    # The classifiers run outside the repo (see _OUTSIDE_REPO), so every path must be absolute.
    model, images = Path(model).resolve(), [Path(image).resolve() for image in images]
    old_python = ensure_venv(venv)
    current = classify_with(Path(sys.executable), model, images)
    old = classify_with(old_python, model, images)
    same = sum(current[f][0] == old.get(f, (None,))[0] for f in current)
    # The two runtimes' int8 kernels round differently: how far apart are the scores when the labels agree?
    gaps = [(abs(current[f][1] - old[f][1]), f) for f in current if f in old and current[f][0] == old[f][0]]
    return {
        "images": len(images),
        "same_top1": same,
        "largest_score_gap": max(gaps, default=(0.0, None)),
        "backends": [backend_of(Path(sys.executable)), backend_of(old_python)],
        "differences": {f: [current[f], old.get(f)] for f in current if current[f][0] != old.get(f, (None,))[0]},
    }
