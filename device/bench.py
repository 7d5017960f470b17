"""`nebula bench`: where the time and the memory go when the device classifies.

Generates synthetic sky frames once (noise, a light-pollution gradient, stars, a
nebula glow: JPEGs that compress and decode like real captures), then for each
thread count:

- files: runs them through `classify_paths`, as `nebula classify` does (the next
  file decoded in a thread while the interpreter runs this one), and reports each
  stage (decode, preprocess, invoke, postprocess, end to end = one file's latency)
  and *per image*: the time between two answers, what a folder of files costs;
- camera frames: classifies frames already in memory at the size the Pi camera's
  lores stream delivers (the model's content size), as `nebula run` does;
- bare invoke: the interpreter alone, on the same input, repeated.

Median and p90 of each, and the two ratios that say how much the pipeline adds
to the model: per image / bare invoke on files, camera frame / bare invoke.

Memory is measured in fresh processes with TensorFlow blocked from importing
(what a Raspberry Pi's device install runs): the peak RSS of classifying one
JPEG, with the resident size after each step (Python, numpy, Pillow, our modules,
the TFLite runtime, the model, the image) to show where it goes; the peak of the
`nebula classify` command itself (click and every command module); and the peak
of classifying one FITS frame (numpy alone reads it: astropy, about 24 MB of
imports, is left for tile-compressed .fz files, and the child reports whether it was loaded).

Targets (reported, never asserted): at 1 interpreter thread, files at most 1.15x
and camera frames at most 1.05x the bare invoke; peak RSS of one JPEG at most 48 MB.
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

from nebula.device.classify import classify_paths, open_classifier
from nebula.device.decode import load_image
from nebula.device.preprocess import prepare

STAGES = ("decode", "preprocess", "invoke", "postprocess", "end_to_end", "per_image", "camera_frame", "camera_frame_tta",
          "bare_invoke")
BENCH_TTA = 4  # `--tta 4`: what test-time augmentation costs per camera frame
TARGET_FILES_RATIO = 1.15
TARGET_FRAMES_RATIO = 1.05
TARGET_RSS_MB = 48.0
_WARMUP = 3
_CAMERA_FRAMES = 16  # distinct frames in memory, cycled

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

# Classifies one image (argv: model, image) and says how resident memory grew, step by step.
_RSS_CHILD = TENSORFLOW_BLOCKER + """
import json


def rss_kb(field="VmRSS"):
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


steps = [("Python", rss_kb())]
import numpy
steps.append(("numpy", rss_kb()))
import PIL.Image
steps.append(("Pillow", rss_kb()))
from pathlib import Path
from nebula.device.classify import classify_file, open_classifier
steps.append(("nebula.device modules", rss_kb()))
from nebula.device.runtime import load_interpreter_class
load_interpreter_class()
steps.append(("TFLite runtime", rss_kb()))
classifier = open_classifier(sys.argv[1], 1)
steps.append(("model loaded (interpreter, XNNPACK)", rss_kb()))
identifier = None
if len(sys.argv) > 3:  # a catalog file: classify as `nebula classify --catalog` does
    from nebula.device.identify import Identifier
    from nebula.device.skycatalog import SkyCatalog

    identifier = Identifier(SkyCatalog.load(sys.argv[3]))
result = classify_file(classifier, Path(sys.argv[2]), identifier=identifier)
steps.append(("one image classified", rss_kb()))
peak_kb = rss_kb("VmHWM")
if peak_kb is None:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_kb = peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux
print(json.dumps({
    "peak_rss_kb": peak_kb,
    "steps": steps if all(kb is not None for _, kb in steps) else None,
    "label": result.prediction.label if result.prediction else None,
    "error": result.error,
    "tensorflow_loaded": any(m.split(".")[0] in ("tensorflow", "keras") for m in sys.modules),
    "astropy_loaded": "astropy" in sys.modules,
    "catalog_main": ((result.sky.catalog or {}).get("main") or {}).get("designation") if result.sky else None,
}))
"""

# The `nebula classify` command itself (argv: model, image, where to write its peak RSS), TensorFlow blocked.
_CLI_CHILD = TENSORFLOW_BLOCKER + """
import atexit


def write_peak(path=sys.argv[3]):
    with open("/proc/self/status") as status, open(path, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))


atexit.register(write_peak)  # click ends the command with sys.exit
from nebula.cli import main

# An empty config file: the user's /etc or ~/.config settings (catalog on, tta 8, ...) must not change the figure.
sys.argv = ["nebula", "classify", "--model", sys.argv[1], "--num-threads", "1", "--config", sys.argv[4], sys.argv[2]]
main()
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
    camera_size = classifier.spec.content_size(*size)
    report = {
        "model": str(model_path),
        "model_sha256": classifier.sha256,
        "model_bytes": model_path.stat().st_size,
        "input_size": classifier.spec.input_size,
        "backend": classifier.backend,
        "images": images,
        "frame_size": list(size),
        "camera_frame_size": list(camera_size),
        "threads": {},
        "targets": {"files_over_bare_invoke_at_1_thread": TARGET_FILES_RATIO,
                    "camera_frames_over_bare_invoke_at_1_thread": TARGET_FRAMES_RATIO, "peak_rss_mb": TARGET_RSS_MB},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    del classifier
    rng = np.random.default_rng(1)
    camera_frames = [synthetic_sky(*camera_size, rng) for _ in range(min(images, _CAMERA_FRAMES))]
    with tempfile.TemporaryDirectory(prefix="nebula-bench-") as folder:
        paths = write_frames(Path(folder), images, size, progress)
        report["jpeg_bytes_median"] = int(np.median([p.stat().st_size for p in paths]))
        for threads in thread_counts:
            report["threads"][str(threads)] = _time_threads(model_path, paths, camera_frames, threads, images, progress)
        frame = write_fits_frame(Path(folder) / "frame.fits", size)
        report["memory"] = _memory(model_path, paths[0], frame)
        if catalog_file is not None:
            report["memory"].update(_fits_with_catalog(model_path, frame, catalog_file))
            report["catalog_file"] = str(catalog_file)
    report["peak_rss_mb"], report["peak_rss_device_only"] = report["memory"]["peak_rss_mb"], report["memory"]["device_only"]
    return report


def _time_threads(model_path: Path, paths: list[Path], frames: list[np.ndarray], threads: int, count: int, progress) -> dict:
    classifier = open_classifier(model_path, threads)
    for _ in classify_paths(classifier, paths[:_WARMUP]):
        pass
    samples = {stage: [] for stage in STAGES}
    done_at = []
    for i, result in enumerate(classify_paths(classifier, paths)):
        done_at.append(time.perf_counter())
        if result.error:
            raise BenchError(f"{result.file}: {result.error}")
        for stage in ("decode", "preprocess", "invoke", "postprocess", "end_to_end"):
            samples[stage].append(result.timings_ms[stage])
        _report(progress, f"timing files, {threads} thread(s)", i + 1, len(paths))
    # What a folder costs per file: the time between two answers (the first one has no predecessor).
    samples["per_image"] = list(np.diff(done_at) * 1e3) if len(done_at) > 1 else [samples["end_to_end"][0]]
    for i in range(count):
        frame = frames[i % len(frames)]
        t0 = time.perf_counter()
        classifier.classify(frame)
        samples["camera_frame"].append((time.perf_counter() - t0) * 1e3)
    _report(progress, f"timing camera frames, {threads} thread(s)", count, count)
    with_tta = open_classifier(model_path, threads, BENCH_TTA)
    for i in range(max(1, count // BENCH_TTA)):
        t0 = time.perf_counter()
        with_tta.classify(frames[i % len(frames)])
        samples["camera_frame_tta"].append((time.perf_counter() - t0) * 1e3)
    samples["bare_invoke"] = _bare_invoke_ms(classifier, paths[0], repeats=max(len(paths), 20))
    stats = {stage: _summary(values) for stage, values in samples.items()}
    bare = stats["bare_invoke"]["median_ms"]
    stats["files_over_bare_invoke"] = round(stats["per_image"]["median_ms"] / bare, 3)
    stats["camera_frames_over_bare_invoke"] = round(stats["camera_frame"]["median_ms"] / bare, 3)
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


def _memory(model_path: Path, jpeg: Path, fits_frame: Path) -> dict:
    """Peak RSS of fresh device-only processes: the library on one JPEG (step by step), the CLI, one FITS frame."""
    library = _child([sys.executable, "-c", _RSS_CHILD, str(model_path), str(jpeg)])
    if library["error"]:
        raise BenchError(f"the device-only process could not classify {jpeg}: {library['error']}")
    fits = _child([sys.executable, "-c", _RSS_CHILD, str(model_path), str(fits_frame)])
    if fits["error"]:
        raise BenchError(f"the device-only process could not classify {fits_frame}: {fits['error']}")
    cli_kb = _cli_peak_kb(model_path, jpeg)
    steps, previous = [], 0
    for name, kb in library["steps"] or []:
        steps.append({"step": name, "rss_mb": round(kb / 1024, 1), "added_mb": round((kb - previous) / 1024, 1)})
        previous = kb
    return {
        "peak_rss_mb": round(library["peak_rss_kb"] / 1024, 1),
        "device_only": not library["tensorflow_loaded"] and not fits["tensorflow_loaded"],
        "steps": steps,
        "astropy_loaded_for_jpeg": library["astropy_loaded"],
        "cli_peak_rss_mb": round(cli_kb / 1024, 1) if cli_kb else None,
        "fits_peak_rss_mb": round(fits["peak_rss_kb"] / 1024, 1),
        "astropy_loaded_for_fits": fits["astropy_loaded"],
    }


def _child(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"the device-only process failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cli_peak_kb(model_path: Path, image: Path) -> int | None:
    """Peak RSS (KiB) of `nebula classify MODEL IMAGE` in a fresh process; None without /proc."""
    if not Path("/proc/self/status").exists():
        return None
    with tempfile.TemporaryDirectory() as folder:
        peak_file = Path(folder) / "peak_kb"
        empty_config = Path(folder) / "config.toml"
        empty_config.write_text("")
        done = subprocess.run([sys.executable, "-c", _CLI_CHILD, str(model_path), str(image), str(peak_file),
                               str(empty_config)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or not peak_file.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"'nebula classify' failed in the memory check (exit {done.returncode}): {last}")
        return int(peak_file.read_text())


def _fits_with_catalog(model_path: Path, fits_frame: Path, catalog_file: str | Path) -> dict:
    """Peak RSS of a fresh device-only process classifying the FITS frame as `nebula classify --catalog` does,
    and the catalog object it found there."""
    child = _child([sys.executable, "-c", _RSS_CHILD, str(model_path), str(fits_frame), str(catalog_file)])
    if child["error"]:
        raise BenchError(f"the device-only process could not classify {fits_frame}: {child['error']}")
    if child["catalog_main"] is None:
        raise BenchError(f"the device-only process found no catalog object for {fits_frame} in {catalog_file}")
    return {"fits_catalog_peak_rss_mb": round(child["peak_rss_kb"] / 1024, 1), "fits_catalog_main": child["catalog_main"]}


def _summary(values: list[float]) -> dict:
    return {"median_ms": round(float(np.median(values)), 3), "p90_ms": round(float(np.percentile(values, 90)), 3)}


def _report(progress, what: str, done: int, total: int) -> None:
    if progress:
        progress(what, done, total)


_ROWS = (("decode", "decode"), ("preprocess", "preprocess"), ("invoke", "invoke"), ("postprocess", "postprocess"),
         ("end to end", "end_to_end"), ("per image", "per_image"), ("camera frame", "camera_frame"),
         (f"camera, tta {BENCH_TTA}", "camera_frame_tta"), ("bare invoke", "bare_invoke"))


def format_table(report: dict) -> str:
    """The report as a table for people."""
    threads = list(report["threads"])
    w, h = report["frame_size"]
    cw, ch = report["camera_frame_size"]
    lines = [
        f"model {report['model']}  ({report['model_bytes'] / 1e6:.2f} MB, {report['input_size']} px, {report['backend']})",
        f"{report['images']} synthetic {w}x{h} JPEG files (median {report['jpeg_bytes_median'] / 1e3:.0f} kB), "
        f"and {cw}x{ch} camera frames in memory",
        "",
        f"{'ms':<14}" + "".join(f"{t + (' thread' if t == '1' else ' threads'):>20}" for t in threads),
        f"{'':<14}" + "".join(f"{'median':>10}{'p90':>10}" for _ in threads),
    ]
    for title, stage in _ROWS:
        row = "".join(f"{report['threads'][t][stage]['median_ms']:>10.2f}{report['threads'][t][stage]['p90_ms']:>10.2f}" for t in threads)
        lines.append(f"{title:<14}{row}")
    for title, key, target in (("files / bare", "files_over_bare_invoke", TARGET_FILES_RATIO),
                               ("camera / bare", "camera_frames_over_bare_invoke", TARGET_FRAMES_RATIO)):
        ratios = "".join(f"{report['threads'][t][key]:>9.2f}x{'':>10}" for t in threads)
        lines.append(f"{title:<14}{ratios}   (target <= {target:.2f}x at 1 thread)")
    memory = report["memory"]
    device_only = "TensorFlow blocked" if memory["device_only"] else "TensorFlow was loaded!"
    lines += ["", f"peak RSS, fresh process classifying one JPEG ({device_only}): {memory['peak_rss_mb']:.1f} MB"
                  f"  (target <= {TARGET_RSS_MB:.0f} MB)"]
    if memory["steps"]:
        lines.append(f"  {'resident after':<38}{'MB':>7}{'added':>8}")
        lines += [f"  {step['step']:<38}{step['rss_mb']:>7.1f}{step['added_mb']:>+8.1f}" for step in memory["steps"]]
    if memory["cli_peak_rss_mb"]:
        lines.append(f"peak RSS of 'nebula classify' on the same JPEG (the command, click included): {memory['cli_peak_rss_mb']:.1f} MB")
    astropy = "astropy imported!" if memory["astropy_loaded_for_fits"] else "numpy alone, no astropy"
    lines.append(f"peak RSS classifying one {w}x{h} 16-bit FITS frame ({astropy}): {memory['fits_peak_rss_mb']:.1f} MB")
    if "fits_catalog_peak_rss_mb" in memory:
        lines.append(f"peak RSS, the same FITS frame with --catalog (position from its header, catalog look-up "
                     f"found {memory['fits_catalog_main']}): {memory['fits_catalog_peak_rss_mb']:.1f} MB")
    return "\n".join(lines)
