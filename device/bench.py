"""`nebula bench`: where the time goes when the device classifies a camera-sized JPEG.

Generates synthetic sky frames once (noise, a light-pollution gradient, stars, a
nebula glow: JPEGs that compress and decode like real captures), then for each
thread count times every stage of the same path `nebula classify` takes
(decode, preprocess, invoke, postprocess, end to end) and the bare invoke (the
interpreter alone, on the same input, repeated), and reports median and p90.
The end-to-end / bare-invoke ratio says how much the pipeline adds to the model.
Peak memory is measured in a fresh process that classifies one image with
TensorFlow blocked from importing: what a Raspberry Pi's device install uses.

Targets (reported, never asserted): end to end at most 1.5x the bare invoke at
1 thread; peak RSS under 70 MB.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from nebula.device.classify import classify_file, open_classifier
from nebula.device.decode import load_image
from nebula.device.preprocess import prepare

STAGES = ("decode", "preprocess", "invoke", "postprocess", "end_to_end")
TARGET_RATIO = 1.5
TARGET_RSS_MB = 70.0
_WARMUP = 3

# Python source that makes importing TensorFlow or Keras fail: run first in a child
# process, it proves the code after it is device-only.
TENSORFLOW_BLOCKER = """
import sys

class _BlockTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
            raise ImportError(f"{name} is blocked: the device side must not import it")
        return None

sys.meta_path.insert(0, _BlockTensorFlow())
"""

_RSS_CHILD = TENSORFLOW_BLOCKER + """
import json
from pathlib import Path

from nebula.device.classify import classify_file, open_classifier

identifier = None
if len(sys.argv) > 3:  # a catalog file: classify as `nebula classify --catalog` does
    from nebula.device.identify import Identifier
    from nebula.device.skycatalog import SkyCatalog

    identifier = Identifier(SkyCatalog.load(sys.argv[3]))
result = classify_file(open_classifier(sys.argv[1], 1), Path(sys.argv[2]), identifier=identifier)
peak_kb = None
try:
    with open("/proc/self/status") as status:
        peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_kb = peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux
print(json.dumps({
    "peak_rss_kb": peak_kb,
    "label": result.prediction.label if result.prediction else None,
    "error": result.error,
    "tensorflow_loaded": any(m.split(".")[0] in ("tensorflow", "keras") for m in sys.modules),
    "catalog_main": (result.sky.catalog or {}).get("main", {}).get("designation") if result.sky and result.sky.catalog else None,
}))
"""


class BenchError(Exception):
    """The bench could not run; one line."""


def synthetic_sky(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A camera-like HxWx3 uint8 sky: sensor noise, a gradient, stars and a coloured nebula glow."""
    small = (max(8, width // 8), max(8, height // 8))
    yy, xx = np.mgrid[0 : small[1], 0 : small[0]].astype(np.float32)
    yy /= small[1]
    xx /= small[0]
    glow = np.zeros(yy.shape, np.float32)
    for _ in range(rng.integers(2, 5)):  # a lumpy nebula: a few overlapping blobs
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.2)
        glow += rng.uniform(0.4, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    colour = np.array([(200, 50, 70), (60, 100, 220), (160, 140, 150)][rng.integers(0, 3)], np.float32)
    gradient = 10 + 14 * yy  # light pollution towards the horizon
    low_res = gradient[..., None] + glow[..., None] * colour * rng.uniform(0.3, 0.9)
    base = Image.fromarray(np.clip(low_res, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    sky = np.asarray(base, dtype=np.float32) + rng.standard_normal((height, width, 3), dtype=np.float32) * 4
    for y, x, peak in zip(rng.integers(2, height - 2, 300), rng.integers(2, width - 2, 300), rng.pareto(1.5, 300) * 40 + 40):
        sky[y - 1 : y + 2, x - 1 : x + 2] += peak * np.array([[0.3, 0.6, 0.3], [0.6, 1.0, 0.6], [0.3, 0.6, 0.3]], np.float32)[..., None]
    return np.clip(sky, 0, 255).astype(np.uint8)


def write_frames(folder: Path, count: int, size: tuple[int, int], progress: Callable[[str, int, int], None] | None = None, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"frame{i:04d}.jpg"
        Image.fromarray(synthetic_sky(*size, rng)).save(path, quality=90)
        paths.append(path)
        _report(progress, "generating frames", i + 1, count)
    return paths


def write_fits_frame(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A linear 16-bit mono FITS capture of a synthetic sky, with the pointing keywords N.I.N.A. writes (M 42)."""
    from astropy.io import fits

    grey = synthetic_sky(*size, np.random.default_rng(seed)).astype(np.float32).mean(axis=2)
    header = fits.Header()
    header["RA"], header["DEC"], header["OBJECT"] = 83.8221, -5.3911, "M 42"
    header["FOCALLEN"], header["XPIXSZ"] = 400.0, 3.76
    fits.PrimaryHDU((1000 + grey * 40).astype(np.uint16), header).writeto(path)
    return path


def run_bench(model: str | Path | None = None, images: int = 200, size: tuple[int, int] = (1024, 768),
              thread_counts=(1, 2), progress: Callable[[str, int, int], None] | None = None,
              catalog_file: str | Path | None = None) -> dict:
    """Measure; returns the report (see `format_table`). Frames go to a temporary folder, removed after.

    With `catalog_file`, peak RSS is also measured for a FITS frame of the same size,
    without and with the catalog look-up (`nebula classify x.fits --catalog`).
    """
    if size[0] < 16 or size[1] < 16:
        raise BenchError(f"frame size {size[0]}x{size[1]} is too small")
    classifier = open_classifier(model, 1)
    model_path = classifier.path
    report = {
        "model": str(model_path),
        "model_sha256": classifier.sha256,
        "model_bytes": model_path.stat().st_size,
        "input_size": classifier.spec.input_size,
        "backend": classifier.backend,
        "images": images,
        "frame_size": list(size),
        "threads": {},
        "targets": {"end_to_end_over_bare_invoke_at_1_thread": TARGET_RATIO, "peak_rss_mb": TARGET_RSS_MB},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    del classifier
    with tempfile.TemporaryDirectory(prefix="nebula-bench-") as folder:
        paths = write_frames(Path(folder), images, size, progress)
        report["jpeg_bytes_median"] = int(np.median([p.stat().st_size for p in paths]))
        for threads in thread_counts:
            report["threads"][str(threads)] = _time_threads(model_path, paths, threads, progress)
        report["peak_rss_mb"], report["peak_rss_device_only"] = _peak_rss_mb(model_path, paths[0])
        if catalog_file is not None:
            frame = write_fits_frame(Path(folder) / "capture.fits", size)
            report["peak_rss_fits_mb"], _ = _peak_rss_mb(model_path, frame)
            report["peak_rss_fits_catalog_mb"], _ = _peak_rss_mb(model_path, frame, catalog_file)
            report["catalog_file"] = str(catalog_file)
    return report


def _time_threads(model_path: Path, paths: list[Path], threads: int, progress) -> dict:
    classifier = open_classifier(model_path, threads)
    for path in paths[:_WARMUP]:
        classify_file(classifier, path)
    samples = {stage: [] for stage in STAGES}
    for i, path in enumerate(paths):
        result = classify_file(classifier, path)
        if result.error:
            raise BenchError(f"{path}: {result.error}")
        for stage in STAGES:
            samples[stage].append(result.timings_ms[stage])
        _report(progress, f"timing {threads} thread(s)", i + 1, len(paths))
    samples["bare_invoke"] = _bare_invoke_ms(classifier, paths[0], repeats=max(len(paths), 20))
    stats = {stage: _summary(values) for stage, values in samples.items()}
    stats["end_to_end_over_bare_invoke"] = round(stats["end_to_end"]["median_ms"] / stats["bare_invoke"]["median_ms"], 3)
    return stats


def _bare_invoke_ms(classifier, path: Path, repeats: int) -> list[float]:
    """The interpreter alone: the same prepared input set once, then invoke() again and again."""
    interpreter = classifier.interpreter
    (detail,) = interpreter.get_input_details()
    batch = prepare(load_image(path, classifier.spec), classifier.spec)[None].astype(detail["dtype"])
    interpreter.set_tensor(detail["index"], batch)
    interpreter.invoke()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _peak_rss_mb(model_path: Path, image: Path, catalog_file: str | Path | None = None) -> tuple[float, bool]:
    """Peak RSS of a fresh process, TensorFlow blocked, that loads the model and classifies one image (with the catalog)."""
    extra = [str(catalog_file)] if catalog_file is not None else []
    done = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(model_path), str(image), *extra],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"the device-only process failed: {last}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    if child["error"]:
        raise BenchError(f"the device-only process could not classify {image}: {child['error']}")
    if catalog_file is not None and child["catalog_main"] is None:
        raise BenchError(f"the device-only process found no catalog object for {image} in {catalog_file}")
    return round(child["peak_rss_kb"] / 1024, 1), not child["tensorflow_loaded"]


def _summary(values: list[float]) -> dict:
    return {"median_ms": round(float(np.median(values)), 3), "p90_ms": round(float(np.percentile(values, 90)), 3)}


def _report(progress, what: str, done: int, total: int) -> None:
    if progress:
        progress(what, done, total)


def format_table(report: dict) -> str:
    """The report as a table for people."""
    threads = list(report["threads"])
    w, h = report["frame_size"]
    lines = [
        f"model {report['model']}  ({report['model_bytes'] / 1e6:.2f} MB, {report['input_size']} px, {report['backend']})",
        f"{report['images']} synthetic {w}x{h} JPEG frames (median {report['jpeg_bytes_median'] / 1e3:.0f} kB)",
        "",
        f"{'ms':<12}" + "".join(f"{t + (' thread' if t == '1' else ' threads'):>20}" for t in threads),
        f"{'':<12}" + "".join(f"{'median':>10}{'p90':>10}" for _ in threads),
    ]
    for stage in (*STAGES, "bare_invoke"):
        row = "".join(f"{report['threads'][t][stage]['median_ms']:>10.2f}{report['threads'][t][stage]['p90_ms']:>10.2f}" for t in threads)
        lines.append(f"{stage.replace('_', ' '):<12}{row}")
    ratios = "".join(f"{report['threads'][t]['end_to_end_over_bare_invoke']:>9.2f}x{'':>10}" for t in threads)
    lines.append(f"{'e2e / bare':<12}{ratios}   (target <= {TARGET_RATIO}x at 1 thread)")
    device_only = "TensorFlow blocked" if report["peak_rss_device_only"] else "TensorFlow was loaded!"
    lines.append("")
    lines.append(f"peak RSS, fresh process classifying one image ({device_only}): {report['peak_rss_mb']:.1f} MB"
                 f"  (target < {TARGET_RSS_MB:.0f} MB)")
    if "peak_rss_fits_catalog_mb" in report:
        lines.append(f"peak RSS, the same for a {w}x{h} 16-bit FITS capture: {report['peak_rss_fits_mb']:.1f} MB; "
                     f"with --catalog: {report['peak_rss_fits_catalog_mb']:.1f} MB")
    return "\n".join(lines)
