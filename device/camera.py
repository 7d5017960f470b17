"""Frame sources: where the daemon's images come from, behind one small interface.

A `FrameSource` is opened with the model's `PreprocessSpec` (so it can size what
it delivers to the model), yields `Frame`s until it runs dry or is stopped, and
is closed. Implementations:

- `PiCamera`: the Raspberry Pi camera through picamera2 (imported only inside it).
  A *lores* stream sized to the model input feeds the model, the *main* stream is
  the preview a person looks at; both come from the same request.
- `WatchFolder`: new captures (any format of `nebula.device.formats`) appearing under a folder, as
  INDI, Ekos/KStars (``<target>/Light/<filter>/``) or any capture program write them.
- `FakeCamera`: generated sky frames, for tests and demos.

`stop()` may be called from a signal handler: it only sets a flag, and every
wait inside a source is sliced so that the source ends within a fraction of a second.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from nebula.device.config import RunConfig
from nebula.device.formats import is_image_name
from nebula.device.preprocess import PreprocessSpec

_WAIT_SLICE_S = 0.1


@dataclass
class Frame:
    """One item for the daemon: an RGB image for the model, or the reason there is none."""

    id: str  # a frame number for live sources, the file's path for a watched folder
    rgb: np.ndarray | None = None  # HxWx3 uint8 RGB, what the model sees
    preview: np.ndarray | None = None  # HxWx3 uint8 RGB, full size, for people (None: use rgb)
    metadata: dict = field(default_factory=dict)  # JSON-safe extras for the results line
    path: Path | None = None  # the capture file, for sidecars
    error: str | None = None  # could not be read: the daemon logs this line and goes on
    skipped: str | None = None  # deliberately not classified (a calibration frame)


class CameraError(Exception):
    """The camera failed and retrying did not bring it back; the message is one line."""


class FrameSource:
    """open(spec) -> frames() -> close(); also a context manager."""

    live = False  # a live source (camera, fake) gets temporal smoothing; files do not

    def __init__(self):
        self._stopping = False
        self.spec: PreprocessSpec | None = None

    def open(self, spec: PreprocessSpec) -> None:
        self.spec = spec

    def frames(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def stop(self) -> None:
        """Ask frames() to end at the next item boundary; safe in a signal handler."""
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def wait(self, seconds: float) -> None:
        """Sleep, but return early once stop() is called."""
        end = time.monotonic() + seconds
        while not self._stopping:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, _WAIT_SLICE_S))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- colour: what picamera2 buffers hold in memory ---------------------------------------

# libcamera names formats by DRM fourcc, little-endian words: "RGB888" is stored B, G, R.
_RGB_ORDER = {
    "RGB888": (2, 1, 0),
    "BGR888": (0, 1, 2),
    "XRGB8888": (2, 1, 0),
    "XBGR8888": (0, 1, 2),
}

# YCbCr -> RGB, BT.601. picamera2's preview configuration uses libcamera's Sycc colour
# space: BT.601 matrix, *full* range (JPEG style). "limited" is the video (16-235) range.
_YUV_RANGES = {
    "full": (0.0, 1.0, (1.402, -0.344136, -0.714136, 1.772)),
    "limited": (16.0, 255.0 / 219.0, (1.596027, -0.391762, -0.812968, 2.017232)),
}


def rgb_from_buffer(array: np.ndarray, fmt: str) -> np.ndarray:
    """A picamera2 RGB-family array (HxWx3 or HxWx4) as HxWx3 RGB uint8."""
    try:
        order = _RGB_ORDER[fmt]
    except KeyError:
        raise ValueError(f"unsupported camera format {fmt!r}; expected one of {sorted(_RGB_ORDER)} or YUV420") from None
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"a {fmt} buffer should be HxWx3 or HxWx4, got {array.shape}")
    return np.ascontiguousarray(array[..., list(order)])


def yuv420_to_rgb(array: np.ndarray, width: int, height: int, value_range: str = "full") -> np.ndarray:
    """Planar YUV420 (I420) as picamera2 gives it, shape (height*3/2, stride), to HxWx3 RGB uint8.

    Rows may be padded to a stride wider than `width`; the U and V planes follow the Y
    plane with half the stride. Chroma is upsampled by repetition (nearest): the model
    input is small and colour, not chroma detail, is what separates nebula types.
    """
    if value_range not in _YUV_RANGES:
        raise ValueError(f"value_range must be one of {tuple(_YUV_RANGES)}, not {value_range!r}")
    if width % 2 or height % 2:
        raise ValueError(f"YUV420 needs an even width and height, got {width}x{height}")
    flat = np.ascontiguousarray(array).reshape(-1)
    stride = flat.size * 2 // (height * 3)
    if stride < width or stride * height * 3 // 2 != flat.size:
        raise ValueError(f"a {width}x{height} YUV420 buffer cannot have {flat.size} bytes")
    y_size, c_size = stride * height, (stride // 2) * (height // 2)
    y = flat[:y_size].reshape(height, stride)[:, :width].astype(np.float32)
    u = flat[y_size : y_size + c_size].reshape(height // 2, stride // 2)[:, : width // 2]
    v = flat[y_size + c_size : y_size + 2 * c_size].reshape(height // 2, stride // 2)[:, : width // 2]
    u = u.repeat(2, axis=0).repeat(2, axis=1).astype(np.float32) - 128.0
    v = v.repeat(2, axis=0).repeat(2, axis=1).astype(np.float32) - 128.0
    offset, y_gain, (rv, gu, gv, bu) = _YUV_RANGES[value_range]
    y = (y - offset) * y_gain
    rgb = np.empty((height, width, 3), dtype=np.float32)
    rgb[..., 0] = y + rv * v
    rgb[..., 1] = y + gu * u + gv * v
    rgb[..., 2] = y + bu * u
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def rgb_to_yuv420(rgb: np.ndarray, value_range: str = "full", stride: int | None = None) -> np.ndarray:
    """The inverse of `yuv420_to_rgb` (chroma averaged over 2x2): to build test buffers and fakes."""
    h, w, _ = rgb.shape
    stride = stride or w
    offset, y_gain, _ = _YUV_RANGES[value_range]
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = (b - y) / 1.772
    v = (r - y) / 1.402
    if value_range == "limited":
        u, v = u * 224 / 255, v * 224 / 255
    y = y / y_gain + offset

    def half(plane):
        return plane.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    out = np.zeros(stride * h * 3 // 2, dtype=np.uint8)
    out[: stride * h].reshape(h, stride)[:, :w] = np.clip(y + 0.5, 0, 255)
    c = (stride // 2) * (h // 2)
    out[stride * h : stride * h + c].reshape(h // 2, stride // 2)[:, : w // 2] = np.clip(half(u) + 128.5, 0, 255)
    out[stride * h + c :].reshape(h // 2, stride // 2)[:, : w // 2] = np.clip(half(v) + 128.5, 0, 255)
    return out.reshape(h * 3 // 2, stride)


# --- the Raspberry Pi camera ---------------------------------------------------------------


def _import_picamera2():
    try:
        from picamera2 import Picamera2
    except ImportError as err:
        raise CameraError(
            f"the camera source needs picamera2 ({err}): on Raspberry Pi OS run 'sudo apt install python3-picamera2' "
            "and make the venv with --system-site-packages"
        ) from None
    return Picamera2()


class PiCamera(FrameSource):
    """The Raspberry Pi camera via picamera2.

    - lores stream: the model's content size (what `prepare` would resize to), so the
      model input needs no resize. A Pi 5 (PiSP) delivers it as RGB888; a Pi 4 (VC4)
      refuses non-YUV lores streams, so on that refusal it is reconfigured as YUV420
      and converted here (BT.601, full range: picamera2's preview colour space, Sycc).
    - main stream: RGB888 at `preview_size`, the preview saved and shown on the page.
    - RGB888 is B, G, R in memory (libcamera's naming): converted to RGB here.
    - `exposure_us` / `gain`: manual exposure and analogue gain with AeEnable off.
    - a failed capture is logged as an error frame and the camera is reopened after an
      exponential back-off (backoff_s, doubling, up to backoff_max_s); after
      `max_retries` failures in a row, `CameraError`.

    `camera_factory` returns a Picamera2-like object (tests inject a fake with its interface).
    """

    live = True

    def __init__(
        self,
        exposure_us: int | None = None,
        gain: float | None = None,
        preview_size: tuple[int, int] = (1280, 960),
        yuv_range: str = "full",
        max_retries: int = 8,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
        camera_factory: Callable[[], object] | None = None,
    ):
        super().__init__()
        if exposure_us is not None and exposure_us <= 0:
            raise ValueError("exposure_us must be positive")
        if gain is not None and gain <= 0:
            raise ValueError("gain must be positive")
        self.exposure_us, self.gain = exposure_us, gain
        self.preview_size = tuple(preview_size)
        self.yuv_range = yuv_range
        self.max_retries, self.backoff_s, self.backoff_max_s = max_retries, backoff_s, backoff_max_s
        self._factory = camera_factory or _import_picamera2
        self._camera = None
        self.lores_size: tuple[int, int] | None = None
        self.lores_format: str | None = None

    def open(self, spec: PreprocessSpec) -> None:
        super().open(spec)
        self._start()

    def controls(self) -> dict:
        """The manual controls to set: AeEnable off as soon as either is given."""
        controls = {}
        if self.exposure_us is not None:
            controls["ExposureTime"] = int(self.exposure_us)
            # Exposures longer than the default frame duration are capped by it: widen it.
            controls["FrameDurationLimits"] = (int(self.exposure_us), int(self.exposure_us))
        if self.gain is not None:
            controls["AnalogueGain"] = float(self.gain)
        if controls:
            controls["AeEnable"] = False
        return controls

    def _start(self) -> None:
        camera = self._factory()
        width, height = self.spec.content_size(*self.preview_size)
        # YUV420 needs even sizes; the ISP also prefers them for RGB. No larger than main.
        self.lores_size = (min(width + width % 2, self.preview_size[0]), min(height + height % 2, self.preview_size[1]))
        try:
            self._configure(camera, "RGB888")
        except RuntimeError as err:
            if "YUV" not in str(err):
                raise
            self._configure(camera, "YUV420")  # VC4 (Pi 4 and earlier): "lores stream must be YUV"
        controls = self.controls()
        if controls:
            camera.set_controls(controls)
        camera.start()
        self._camera = camera

    def _configure(self, camera, lores_format: str) -> None:
        config = camera.create_preview_configuration(
            main={"size": self.preview_size, "format": "RGB888"},
            lores={"size": self.lores_size, "format": lores_format},
            display=None,
            buffer_count=2,
        )
        camera.configure(config)
        # picamera2 aligns stream sizes to what the ISP supports: read back what it chose.
        self.lores_size = tuple(config["lores"]["size"])
        self.lores_format = lores_format

    def _stop_camera(self) -> None:
        camera, self._camera = self._camera, None
        if camera is None:
            return
        for method in ("stop", "close"):
            try:
                getattr(camera, method, lambda: None)()
            except Exception:  # noqa: BLE001 - a camera that just failed may fail to stop too; it is being dropped
                pass

    def frames(self) -> Iterator[Frame]:
        number, failures = 0, 0
        while not self._stopping:
            try:
                if self._camera is None:
                    self._start()
                (lores, main), metadata = self._camera.capture_arrays(["lores", "main"])
            except (RuntimeError, OSError, TimeoutError) as err:
                failures += 1
                number += 1
                if failures > self.max_retries:
                    self._stop_camera()
                    raise CameraError(f"camera: failed {failures} times in a row, giving up ({_one_line(err)})") from None
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** (failures - 1))
                yield Frame(id=str(number), error=f"camera error ({_one_line(err)}); retrying in {delay:g} s")
                self._stop_camera()
                self.wait(delay)
                continue
            failures = 0
            number += 1
            try:
                rgb = self._lores_rgb(lores)
                preview = rgb_from_buffer(main, "RGB888")
            except ValueError as err:
                yield Frame(id=str(number), error=f"bad camera buffer ({err})")
                continue
            yield Frame(id=str(number), rgb=rgb, preview=preview, metadata=_camera_metadata(metadata))

    def _lores_rgb(self, lores: np.ndarray) -> np.ndarray:
        if self.lores_format == "YUV420":
            return yuv420_to_rgb(lores, *self.lores_size, value_range=self.yuv_range)
        return rgb_from_buffer(lores, self.lores_format)

    def close(self) -> None:
        self._stop_camera()


def _camera_metadata(metadata) -> dict:
    """The few request metadata an astrophotographer wants in the log, JSON-safe."""
    metadata = metadata or {}
    picked = {"ExposureTime": "exposure_us", "AnalogueGain": "gain", "SensorTimestamp": "sensor_timestamp_ns"}
    out = {}
    for key, name in picked.items():
        value = metadata.get(key)
        if isinstance(value, (int, float, np.integer, np.floating)):
            out[name] = round(float(value), 3) if name == "gain" else int(value)
    return out


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# --- generated frames ----------------------------------------------------------------------

FAKE_SCENES = ("emission", "reflection", "other")
_SCENE_COLOURS = {"emission": (230, 60, 70), "reflection": (70, 110, 235), "other": (0, 0, 0)}


def fake_sky(scene: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A synthetic sky frame: dark noisy background, stars, and a red or blue glow (none for 'other')."""
    if scene not in _SCENE_COLOURS:
        raise ValueError(f"scene must be one of {FAKE_SCENES}, not {scene!r}")
    size = max(width, height)
    yy, xx = np.mgrid[0:height, 0:width] / size
    image = rng.normal(8, 3, (height, width, 3))
    cy, cx = rng.uniform(0.35, 0.65) * height / size, rng.uniform(0.35, 0.65) * width / size
    glow = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(0.1, 0.2) ** 2))
    image += glow[..., None] * np.array(_SCENE_COLOURS[scene]) * rng.uniform(0.7, 1.0)
    stars = rng.integers(5, 15) * width * height // size**2 if scene != "other" else 60 * width * height // size**2
    for _ in range(max(1, stars)):
        image[rng.integers(0, height), rng.integers(0, width)] = 255
    return np.clip(image, 0, 255).astype(np.uint8)


class FakeCamera(FrameSource):
    """Generated 4:3 sky frames at the model's content size, cycling through the scenes.

    `scene` is one of FAKE_SCENES, or "cycle" to change scene every `hold` frames.
    A small bank of frames per scene is generated once, so a long run costs no more
    than a short one.
    """

    live = True

    def __init__(self, scene: str = "cycle", hold: int = 30, variants: int = 4, seed: int = 0, corrupt_every: int = 0):
        super().__init__()
        if scene != "cycle" and scene not in FAKE_SCENES:
            raise ValueError(f"scene must be 'cycle' or one of {FAKE_SCENES}, not {scene!r}")
        self.scene, self.hold, self.variants, self.seed = scene, max(1, hold), max(1, variants), seed
        self.corrupt_every = corrupt_every  # >0: every Nth frame is a broken buffer, to exercise the error path
        self._bank: dict[str, list[np.ndarray]] = {}

    def open(self, spec: PreprocessSpec) -> None:
        super().open(spec)
        width, height = spec.content_size(4, 3)
        rng = np.random.default_rng(self.seed)
        self._bank = {s: [fake_sky(s, width, height, rng) for _ in range(self.variants)] for s in FAKE_SCENES}

    def scene_of(self, number: int) -> str:
        """The scene shown in frame `number` (1-based)."""
        if self.scene != "cycle":
            return self.scene
        return FAKE_SCENES[((number - 1) // self.hold) % len(FAKE_SCENES)]

    def frames(self) -> Iterator[Frame]:
        number = 0
        while not self._stopping:
            number += 1
            scene = self.scene_of(number)
            if self.corrupt_every and number % self.corrupt_every == 0:
                yield Frame(id=str(number), rgb=np.zeros((4, 4), dtype=np.uint8), metadata={"scene": scene})
                continue
            rgb = self._bank[scene][number % self.variants]
            yield Frame(id=str(number), rgb=rgb, metadata={"scene": scene})


# --- a watched folder ----------------------------------------------------------------------

# Ekos/KStars and most capture programs sort frames into these folders; not sky pictures.
CALIBRATION_FOLDERS = {"dark", "darks", "flat", "flats", "bias", "biases", "offset", "darkflat", "darkflats", "flatdark", "flatdarks"}
FileKey = tuple  # (resolved path, size, mtime_ns): a capture is the same capture only if all three match


def file_key(path: Path, stat: os.stat_result) -> FileKey:
    """The capture's identity: its resolved path, so a folder reached through a symlink is the same folder."""
    return (resolved_name(path), stat.st_size, stat.st_mtime_ns)


def resolved_name(path: str | Path) -> str:
    """The path with every symlink resolved; a broken symlink keeps its own name (in its resolved folder)."""
    real = os.path.realpath(path)
    if os.path.exists(real):
        return real
    return os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


def capture_metadata(root: Path, path: Path) -> dict:
    """Target and filter from the Ekos/KStars tree ``<target>/Light/<filter>/<file>`` (or ``<target>/Light/<file>``)."""
    parts = path.relative_to(root).parts[:-1]
    lowered = [p.lower() for p in parts]
    if "light" not in lowered:
        return {}
    i = len(lowered) - 1 - lowered[::-1].index("light")
    out = {}
    if i >= 1:
        out["target"] = parts[i - 1]
    if i + 1 < len(parts):
        out["filter"] = parts[i + 1]
    return out


@dataclass
class _Pending:
    signature: tuple[int, int]  # (size, mtime_ns) when last seen
    since: float  # monotonic time it was first seen with this signature
    hold_until: float = 0.0  # read as cut short: not offered again before this (unless it changes)


class WatchFolder(FrameSource):
    """New captures under `root` (recursive), each classified once, when complete.

    Complete means: size and mtime unchanged for `settle_s` seconds (and across at
    least two polls), and (on Linux) not open for writing by any process this user
    can see. A file whose decode fails while it is still changing goes back to
    waiting instead of getting an error line. One that reads as cut short (empty,
    truncated, a FITS shorter than its header declares) is only reported once it
    has stayed unchanged for `truncated_grace_s`: a writer that pauses between
    chunks gets that long to finish. Broken symlinks (dangling, looping) under
    `root` get an error line each, once.

    Captures are known by their resolved path: `done` holds the keys already
    classified (the daemon reads them from its results log), so a restart does not
    classify anything twice, even with the folder spelled another way (through a
    symlink); a capture rewritten in place (new size or mtime) is a new capture.
    Frames carry the resolved path.
    """

    def __init__(self, root: str | Path, poll_s: float = 1.0, done: Iterable[FileKey] = (), check_open_files: bool = True,
                 settle_s: float = RunConfig.settle_s, truncated_grace_s: float = RunConfig.truncated_grace_s):
        super().__init__()
        self.root = Path(root).expanduser().absolute()
        self.poll_s, self.settle_s, self.truncated_grace_s = poll_s, settle_s, truncated_grace_s
        self.done: set[FileKey] = {(resolved_name(name), size, mtime) for name, size, mtime in done}
        self.check_open_files = check_open_files
        self._pending: dict[Path, _Pending] = {}

    def open(self, spec: PreprocessSpec) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder to watch")
        super().open(spec)

    def scan(self) -> dict[Path, os.stat_result]:
        """Every capture file under root: skips hidden files and folders and non-image names.

        A broken symlink is listed with its own (lstat) status, so that it gets its error line.
        """
        found = {}
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                if not is_image_name(name):
                    continue
                path = Path(folder, name)
                stat = _stat(path)
                if stat is not None:  # None: deleted between listing and stat
                    found[path] = stat
        return found

    def poll(self) -> list[tuple[Path, os.stat_result]]:
        """One look at the folder: the captures that became complete since the last look, oldest first."""
        now = time.monotonic()
        seen = self.scan()
        candidates = []
        for path, stat in seen.items():
            if file_key(path, stat) in self.done:
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            pending = self._pending.get(path)
            if pending is None or pending.signature != signature:
                self._pending[path] = _Pending(signature, now)
            elif now - pending.since >= self.settle_s and now >= pending.hold_until:
                candidates.append((path, stat))
        for gone in set(self._pending) - set(seen):
            del self._pending[gone]
        if candidates and self.check_open_files:
            writing = files_open_for_writing({p for p, _ in candidates})
            candidates = [(p, s) for p, s in candidates if p not in writing]
        return sorted(candidates, key=lambda item: (item[1].st_mtime_ns, str(item[0])))

    def frames(self) -> Iterator[Frame]:
        from nebula.device.decode import ImageError, IncompleteImage, SkippedImage, load_image

        while not self._stopping:
            for path, stat in self.poll():
                if self._stopping:
                    return
                key = file_key(path, stat)
                resolved = Path(key[0])
                base = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **capture_metadata(self.root, path)}
                calibration = next((p for p in path.relative_to(self.root).parts[:-1] if p.lower() in CALIBRATION_FOLDERS), None)
                if calibration:
                    self.done.add(key)
                    yield Frame(id=str(resolved), path=resolved, metadata=base, skipped=f"calibration frame (in a '{calibration}' folder)")
                    continue
                t0 = time.perf_counter()
                try:
                    rgb = load_image(path, self.spec)
                except SkippedImage as reason:
                    self.done.add(key)
                    yield Frame(id=str(resolved), path=resolved, metadata=base, skipped=reason.cause)
                    continue
                except ImageError as err:
                    if self._changed_since(path, stat) or (isinstance(err, IncompleteImage) and self._hold(path)):
                        continue  # still being written: it gets another chance when it settles
                    self.done.add(key)
                    yield Frame(id=str(resolved), path=resolved, metadata=base, error=err.cause)
                    continue
                self.done.add(key)
                base["decode_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
                yield Frame(id=str(resolved), rgb=rgb, path=resolved, metadata=base)
            self.wait(self.poll_s)

    def _changed_since(self, path: Path, stat: os.stat_result) -> bool:
        now = _stat(path)
        if now is None:
            return True
        if (now.st_size, now.st_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            self._pending[path] = _Pending((now.st_size, now.st_mtime_ns), time.monotonic())
            return True
        return False

    def _hold(self, path: Path) -> bool:
        """A capture that reads as cut short: wait until it has been unchanged for the grace period; False once it has."""
        pending = self._pending.get(path)
        if pending is None or time.monotonic() - pending.since >= self.truncated_grace_s:
            return False
        pending.hold_until = pending.since + self.truncated_grace_s
        return True


def _stat(path: Path) -> os.stat_result | None:
    """The file's status; a broken symlink's own (lstat); None when it is gone."""
    try:
        return path.stat()
    except OSError:
        try:
            return path.lstat() if path.is_symlink() else None
        except OSError:
            return None


def files_open_for_writing(paths: set[Path]) -> set[Path]:
    """Which of `paths` some process has open for writing, from /proc (Linux; elsewhere: none known).

    Processes of other users are not readable and count as not writing; the
    size-stable test still covers them.
    """
    proc = Path("/proc")
    if not proc.is_dir() or not paths:
        return set()
    wanted = {os.path.realpath(p): p for p in paths}
    writing = set()
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        fd_dir = proc / pid / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target not in wanted:
                continue
            try:
                info = (proc / pid / "fdinfo" / fd).read_text()
            except OSError:
                continue
            flags = next((int(line.split()[1], 8) for line in info.splitlines() if line.startswith("flags:")), 0)
            if (flags & 0o3) in (os.O_WRONLY, os.O_RDWR):  # the access mode bits
                writing.add(wanted[target])
    return writing
