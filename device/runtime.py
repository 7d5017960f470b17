"""Load a model once, classify many images: the interpreter and its per-image path.

Interpreter preference: LiteRT (`ai_edge_litert`), then `tflite_runtime`, then
TensorFlow's own `tf.lite` (only present on a workstation install).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nebula.device import modelfile
from nebula.device.config import default_model_path
from nebula.device.modelfile import ModelFileError
from nebula.device.preprocess import prepare

UNKNOWN = "unknown"
# Test-time augmentation: the sky has no "up", so the 8 symmetries of the square are views of one field.
# `--tta N` averages the first N (1 = off); each costs one more invoke, nothing else.
TTA_VIEWS = (
    lambda x: x,
    lambda x: x[:, ::-1],
    lambda x: x[::-1, :],
    lambda x: x[::-1, ::-1],
    lambda x: x.transpose(1, 0, 2),
    lambda x: np.rot90(x, 1),
    lambda x: np.rot90(x, -1),
    lambda x: x[::-1, ::-1].transpose(1, 0, 2),
)

_BACKENDS = (
    ("ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime.interpreter", "tflite-runtime"),
    ("tensorflow.lite", "tensorflow"),  # imported by name, and last: the device never needs it
)


# What the runtime's C++ side prints on every start; kept in Classifier.runtime_notes instead (shown with -v).
_ROUTINE_NOTES = ("INFO: Created TensorFlow Lite XNNPACK delegate",)


class RuntimeMissing(Exception):
    pass


@contextlib.contextmanager
def _native_stderr_into(notes: list[str]):
    """Collect what native code writes to file descriptor 2 meanwhile: routine notes into `notes`,
    anything else back to stderr as it was (an error from the runtime is never hidden)."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to redirect (a daemon with fd 2 closed)
        yield
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
    for line in text.splitlines(keepends=True):
        if line.startswith(_ROUTINE_NOTES):
            notes.append(line.rstrip("\n"))
        else:
            sys.stderr.write(line)
    sys.stderr.flush()


def load_interpreter_class(prefer: str | None = None):
    """Return (Interpreter class, backend name) for the first runtime that imports."""
    tried = []
    for module_name, backend in _BACKENDS:
        if prefer and backend != prefer:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            tried.append(f"{backend} ({err})")
            continue
        return module.Interpreter, backend
    raise RuntimeMissing(
        "no TFLite runtime installed: pip install ai-edge-litert (or tflite-runtime); tried " + ", ".join(tried)
    )


@dataclass
class Prediction:
    label: str
    score: float
    top_k: list[tuple[str, float]]
    timings_ms: dict[str, float] = field(default_factory=dict)
    probabilities: np.ndarray | None = None  # every label's score, in label order (for smoothing)

    @classmethod
    def from_probabilities(cls, probs: np.ndarray, labels: list[str], top_k: int | None = None, threshold: float = 0.0):
        """Rank `probs`. These defaults are no policy (every label, no cut-off); the routes pass RunConfig's."""
        # uint8 outputs tie often (256 levels): a stable sort on -p breaks ties by label order, as argmax does
        order = np.argsort(-np.asarray(probs), kind="stable")[: max(1, top_k or len(labels))]
        ranked = [(labels[i], float(probs[i])) for i in order]
        label, score = ranked[0]
        return cls(label=label if score >= threshold else UNKNOWN, score=score, top_k=ranked, probabilities=probs)


class Classifier:
    """A .tflite model file, loaded once: `classify(rgb)` prepares, invokes, ranks."""

    def __init__(self, model_path: str | Path | None = None, num_threads: int | None = None, backend: str | None = None,
                 tta: int = 1):
        if not 1 <= tta <= len(TTA_VIEWS):
            raise ValueError(f"tta must be between 1 and {len(TTA_VIEWS)}, not {tta}")
        self.tta = tta
        self.path = Path(model_path) if model_path else default_model_path()
        self.model = modelfile.read(self.path)
        self.labels = self.model.labels
        self.spec = self.model.preprocess
        self.sha256 = self.model.sha256
        Interpreter, self.backend = load_interpreter_class(backend)
        self.runtime_notes: list[str] = []  # the runtime's routine INFO lines, for a verbose caller to show
        try:
            with _native_stderr_into(self.runtime_notes):
                self.interpreter = Interpreter(model_content=self.model.data, num_threads=num_threads)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise ModelFileError(f"{self.path}: the runtime cannot load it ({err})") from None
        (inp,) = self.interpreter.get_input_details()
        (out,) = self.interpreter.get_output_details()
        s = self.spec.input_size
        if tuple(inp["shape"]) != (1, s, s, 3):
            raise ModelFileError(f"{self.path}: input shape {tuple(inp['shape'])} does not match the manifest's {s}x{s}x3")
        if int(np.prod(out["shape"])) != len(self.labels):
            raise ModelFileError(
                f"{self.path}: the model has {int(np.prod(out['shape']))} outputs but {len(self.labels)} labels"
            )
        self._input_index, self._input_dtype = inp["index"], inp["dtype"]
        self._output_index, self._output_dtype = out["index"], out["dtype"]
        self._output_scale, self._output_zero = out["quantization"]
        self._batch = np.zeros((1, s, s, 3), dtype=self._input_dtype)

    def invoke(self, image: np.ndarray) -> np.ndarray:
        """Run the model on one prepared (S, S, 3) uint8 image; returns probabilities (float32)."""
        self._batch[0] = image  # casts to the input dtype; uint8 -> uint8 is a plain copy
        self.interpreter.set_tensor(self._input_index, self._batch)
        self.interpreter.invoke()
        raw = self.interpreter.get_tensor(self._output_index)[0]
        if self._output_scale:
            return (raw.astype(np.float32) - self._output_zero) * np.float32(self._output_scale)
        return raw.astype(np.float32)

    def invoke_views(self, image: np.ndarray) -> np.ndarray:
        """`invoke`, averaged over the first `tta` symmetric views of the prepared image (one invoke when tta is 1)."""
        if self.tta == 1:
            return self.invoke(image)
        return np.mean([self.invoke(view(image)) for view in TTA_VIEWS[: self.tta]], axis=0)

    def classify(self, rgb, top_k: int | None = None, threshold: float = 0.0) -> Prediction:
        """Classify one RGB image of any size (PIL image or HxWx3 uint8 array); top_k/threshold as `Prediction`'s."""
        t0 = time.perf_counter()
        image = prepare(rgb, self.spec)
        preprocess_ms = (time.perf_counter() - t0) * 1e3
        prediction = self.classify_prepared(image, top_k, threshold)
        prediction.timings_ms = {"preprocess": preprocess_ms, **prediction.timings_ms}
        return prediction

    def classify_prepared(self, image: np.ndarray, top_k: int | None = None, threshold: float = 0.0) -> Prediction:
        """Invoke and rank one image `prepare` already made: the part of `classify` that needs the interpreter."""
        t1 = time.perf_counter()
        probs = self.invoke_views(image)
        t2 = time.perf_counter()
        prediction = Prediction.from_probabilities(probs, self.labels, top_k, threshold)
        t3 = time.perf_counter()
        prediction.timings_ms = {"invoke": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3}
        return prediction
