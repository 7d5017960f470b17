"""Frame sources: colour conversions on known pixels, the picamera2 source against a fake
object with picamera2's interface, and the watched folder (complete files only, once)."""

import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import sky_image
from nebula.device.camera import (
    CameraError,
    FakeCamera,
    PiCamera,
    WatchFolder,
    capture_metadata,
    fake_sky,
    files_open_for_writing,
    rgb_from_buffer,
    rgb_to_yuv420,
    yuv420_to_rgb,
)
from nebula.device.preprocess import PreprocessSpec

SPEC = PreprocessSpec(input_size=32)


# --- colour -----------------------------------------------------------------------------------


def test_rgb888_is_bgr_in_memory_and_becomes_rgb():
    red_in_memory = np.zeros((2, 3, 3), np.uint8)
    red_in_memory[..., 2] = 255  # picamera2 "RGB888": bytes B, G, R
    rgb = rgb_from_buffer(red_in_memory, "RGB888")
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb_from_buffer(red_in_memory, "BGR888")[0, 0].tolist() == [0, 0, 255]  # "BGR888" is R, G, B
    xrgb = np.array([[[10, 20, 30, 255]]], np.uint8)  # "XRGB8888": B, G, R, X
    assert rgb_from_buffer(xrgb, "XRGB8888")[0, 0].tolist() == [30, 20, 10]
    with pytest.raises(ValueError, match="unsupported camera format"):
        rgb_from_buffer(red_in_memory, "NV12")


# Textbook BT.601 YCbCr of pure colours: JFIF full range, and video (16-235) range.
FULL = {(255, 0, 0): (76, 85, 255), (0, 255, 0): (150, 44, 21), (0, 0, 255): (29, 255, 107), (255, 255, 255): (255, 128, 128), (0, 0, 0): (0, 128, 128)}
LIMITED = {(255, 0, 0): (81, 90, 240), (0, 255, 0): (145, 54, 34), (0, 0, 255): (41, 240, 110), (255, 255, 255): (235, 128, 128), (0, 0, 0): (16, 128, 128)}


def _i420(blocks, stride):
    """A planar YUV420 buffer, (h*3/2, stride) as picamera2 gives it, of 2x2 blocks of given (Y, U, V)."""
    w, h = 2 * len(blocks), 2
    buffer = np.full(stride * h * 3 // 2, 77, np.uint8)  # padding bytes: must be ignored
    y = buffer[: stride * h].reshape(h, stride)
    u = buffer[stride * h : stride * h + stride // 2].reshape(1, stride // 2)
    v = buffer[stride * h + stride // 2 :].reshape(1, stride // 2)
    for i, (Y, U, V) in enumerate(blocks):
        y[:, 2 * i : 2 * i + 2], u[0, i], v[0, i] = Y, U, V
    return buffer.reshape(h * 3 // 2, stride), w, h


@pytest.mark.parametrize("value_range,table", [("full", FULL), ("limited", LIMITED)])
def test_yuv420_of_known_colours_converts_within_tolerance(value_range, table):
    colours = list(table)
    buffer, w, h = _i420([table[c] for c in colours], stride=16)  # stride wider than the 10-pixel width
    rgb = yuv420_to_rgb(buffer, w, h, value_range)
    assert rgb.shape == (2, 10, 3)
    for i, colour in enumerate(colours):
        got = rgb[:, 2 * i : 2 * i + 2].reshape(-1, 3)
        assert np.abs(got.astype(int) - colour).max() <= 3, f"{value_range} {colour} -> {got[0].tolist()}"


def test_yuv420_flat_buffer_and_bad_sizes():
    buffer, w, h = _i420([FULL[(255, 0, 0)]], stride=2)
    assert yuv420_to_rgb(buffer.reshape(-1), w, h)[0, 0].tolist()[0] >= 252  # capture_buffer's 1-D form
    with pytest.raises(ValueError, match="cannot have"):
        yuv420_to_rgb(buffer.reshape(-1)[:-1], w, h)


def test_rgb_to_yuv420_round_trips_a_sky():
    sky = fake_sky("emission", 40, 30, np.random.default_rng(1))
    back = yuv420_to_rgb(rgb_to_yuv420(sky, stride=64), 40, 30)
    # Chroma is shared by 2x2 pixels: compare the mean colour, which is what tells red from blue.
    assert np.abs(back.reshape(-1, 3).mean(0) - sky.reshape(-1, 3).mean(0)).max() < 2


# --- the picamera2 source, against an object with picamera2's interface -------------------------


class FakePicamera2:
    """picamera2's interface: configurations are dicts, RGB888 arrays are B,G,R, YUV420 arrays are
    (h*3/2, stride); `vc4=True` refuses non-YUV lores streams like a Pi 4; `fail` capture calls raise."""

    instances = []

    def __init__(self, scene: np.ndarray, vc4=False, fail=()):
        self.scene, self.vc4, self.fail = scene, vc4, set(fail)
        self.calls, self.controls, self.config, self.started, self.closed = [], {}, None, False, False
        self.captures = 0
        FakePicamera2.instances.append(self)

    def create_preview_configuration(self, main=None, lores=None, display="main", buffer_count=4, **_):
        config = {"main": dict(main or {"size": (640, 480), "format": "XBGR8888"}), "lores": dict(lores) if lores else None,
                  "display": display, "buffer_count": buffer_count, "colour_space": "Sycc"}
        if config["lores"] and config["lores"]["format"] == "YUV420":
            w, h = config["lores"]["size"]
            config["lores"]["size"] = (w + (-w) % 2, h + (-h) % 2)
        return config

    def configure(self, config):
        self.calls.append("configure")
        if self.vc4 and config["lores"]["format"] != "YUV420":
            raise RuntimeError("lores stream must be YUV")
        self.config = config

    def set_controls(self, controls):
        self.calls.append("set_controls")
        self.controls.update(controls)

    def start(self):
        self.calls.append("start")
        self.started = True

    def _array(self, stream):
        w, h = self.config[stream]["size"]
        rgb = np.asarray(Image.fromarray(self.scene).resize((w, h), Image.BILINEAR))
        if self.config[stream]["format"] == "YUV420":
            return rgb_to_yuv420(rgb, stride=w + 32)
        assert self.config[stream]["format"] == "RGB888"
        return np.ascontiguousarray(rgb[..., ::-1])  # B, G, R in memory

    def capture_arrays(self, names=("main",)):
        self.captures += 1
        if self.captures in self.fail:
            raise RuntimeError("Camera frontend has timed out!")
        return [self._array(n) for n in names], {"ExposureTime": 2000000, "AnalogueGain": 8.0, "SensorTimestamp": 123}

    def capture_array(self, name="main"):
        return self.capture_arrays([name])[0][0]

    def stop(self):
        self.calls.append("stop")
        self.started = False

    def close(self):
        self.closed = True


def _first_frames(source, n):
    frames = source.frames()
    out = [next(frames) for _ in range(n)]
    frames.close()
    return out


RED_SKY = np.zeros((96, 128, 3), np.uint8)
RED_SKY[...] = (200, 30, 40)


@pytest.mark.parametrize("vc4", [False, True], ids=["pi5-rgb888-lores", "pi4-yuv420-lores"])
def test_picamera_delivers_rgb_in_the_right_colours(vc4):
    camera = PiCamera(preview_size=(128, 96), camera_factory=lambda: FakePicamera2(RED_SKY, vc4=vc4))
    camera.open(SPEC)
    (frame,) = _first_frames(camera, 1)
    camera.close()
    assert camera.lores_format == ("YUV420" if vc4 else "RGB888")
    assert frame.rgb.shape == (24, 32, 3)  # the model's content size for a 4:3 frame: no resize needed
    assert frame.preview.shape == (96, 128, 3)
    assert np.abs(frame.rgb.reshape(-1, 3).mean(0) - (200, 30, 40)).max() < 4
    assert frame.preview[0, 0].tolist() == [200, 30, 40]
    assert frame.metadata == {"exposure_us": 2000000, "gain": 8.0, "sensor_timestamp_ns": 123}


def test_picamera_sets_manual_exposure_and_gain_before_start():
    fake = FakePicamera2(RED_SKY)
    camera = PiCamera(exposure_us=2_000_000, gain=8, preview_size=(128, 96), camera_factory=lambda: fake)
    camera.open(SPEC)
    camera.close()
    assert fake.controls == {"AeEnable": False, "ExposureTime": 2_000_000, "AnalogueGain": 8.0, "FrameDurationLimits": (2_000_000, 2_000_000)}
    assert fake.calls.index("set_controls") < fake.calls.index("start")
    assert fake.calls[-1] == "stop" and fake.closed
    assert fake.config["lores"]["size"] == (32, 24) and fake.config["main"] == {"size": (128, 96), "format": "RGB888"}


def test_automatic_exposure_sets_no_controls():
    fake = FakePicamera2(RED_SKY)
    camera = PiCamera(preview_size=(128, 96), camera_factory=lambda: fake)
    camera.open(SPEC)
    assert "set_controls" not in fake.calls


def test_camera_errors_are_retried_with_exponential_back_off_then_given_up():
    FakePicamera2.instances = []
    # The first camera fails on its 2nd capture, each reopened one on its 1st: failures in a row.
    fails = iter([{2}, {1}, {2}, {1}, {1}, {1}])
    camera = PiCamera(preview_size=(128, 96), backoff_s=0.01, backoff_max_s=0.02, max_retries=3,
                      camera_factory=lambda: FakePicamera2(RED_SKY, fail=next(fails)))
    camera.open(SPEC)
    frames = camera.frames()
    first, failed, failed_again, recovered = (next(frames) for _ in range(4))
    assert first.rgb is not None
    assert failed.error == "camera error (Camera frontend has timed out!); retrying in 0.01 s"
    assert failed_again.error.endswith("retrying in 0.02 s")  # doubled
    assert recovered.rgb is not None and recovered.id == "4"
    assert FakePicamera2.instances[0].closed  # a failed camera is stopped and closed before reopening
    with pytest.raises(CameraError, match="failed 4 times in a row, giving up"):
        list(frames)
    assert len(FakePicamera2.instances) == 6


def test_picamera_without_picamera2_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_picamera2(name, *args, **kwargs):
        if name.startswith("picamera2"):
            raise ImportError("No module named 'picamera2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_picamera2)
    with pytest.raises(CameraError, match="apt install python3-picamera2"):
        PiCamera().open(SPEC)


# --- fake camera ------------------------------------------------------------------------------


def test_fake_camera_cycles_scenes_at_the_model_size():
    camera = FakeCamera(hold=2)
    camera.open(SPEC)
    frames = _first_frames(camera, 6)
    assert [f.metadata["scene"] for f in frames] == ["emission", "emission", "reflection", "reflection", "other", "other"]
    assert frames[0].rgb.shape == (24, 32, 3)
    red, blue = frames[0].rgb.reshape(-1, 3).mean(0), frames[2].rgb.reshape(-1, 3).mean(0)
    assert red[0] > red[2] and blue[2] > blue[0]


# --- the watched folder -----------------------------------------------------------------------


def _png_bytes(label="emission", seed=0) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(sky_image(label, seed=seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def _watch(root, **kw):
    kw = {"settle_s": 0, "truncated_grace_s": 0, **kw}  # two polls of stability, as a fast writer needs
    source = WatchFolder(root, poll_s=0.01, **kw)
    source.open(SPEC)
    return source


def test_a_file_written_slowly_while_open_is_taken_only_when_closed(tmp_path):
    data = _png_bytes()
    source = _watch(tmp_path)
    path = tmp_path / "M42.png"
    with open(path, "wb") as file:
        for i in range(0, len(data), 200):
            file.write(data[i : i + 200])
            file.flush()
            assert source.poll() == []
        # Size now stable across polls, but still open for writing: not complete.
        assert files_open_for_writing({path}) == {path}
        assert source.poll() == [] and source.poll() == []
    assert files_open_for_writing({path}) == set()
    ready = source.poll()
    assert [p for p, _ in ready] == [path]


def test_a_file_appended_in_chunks_waits_for_a_stable_size(tmp_path):
    data = _png_bytes()
    source = _watch(tmp_path, check_open_files=False)
    path = tmp_path / "capture.png"
    for i in range(0, len(data), 300):
        with open(path, "ab") as file:  # closed between chunks, like a program that reopens
            file.write(data[i : i + 300])
        assert source.poll() == [], f"taken after {i + 300} of {len(data)} bytes"
    ready = source.poll()
    assert [p for p, _ in ready] == [path]


def test_each_capture_is_yielded_once_and_bad_files_get_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes())
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "notes.txt").write_text("not a capture")
    (tmp_path / ".hidden.png").write_bytes(_png_bytes())
    source = _watch(tmp_path)
    frames = source.frames()
    got = [next(frames) for _ in range(2)]
    by_name = {f.path.name: f for f in got}
    assert set(by_name) == {"a.png", "b.jpg"}
    assert by_name["a.png"].rgb.shape == (64, 64, 3) and by_name["a.png"].error is None
    assert "truncated or corrupt" in by_name["b.jpg"].error or "cannot decode" in by_name["b.jpg"].error
    # Nothing more arrives: a third item would need a new file. Stop from another thread, like a signal.
    threading.Timer(0.2, source.stop).start()
    assert list(frames) == []


def test_ekos_tree_gives_target_and_filter_and_skips_calibration_folders(tmp_path):
    light = tmp_path / "M 42" / "Light" / "Ha"
    light.mkdir(parents=True)
    (light / "M 42_Light_Ha_300_secs_2024-11-02T01-02-03_001.png").write_bytes(_png_bytes())
    dark = tmp_path / "M 42" / "Dark"
    dark.mkdir()
    (dark / "M 42_Dark_300_secs_001.png").write_bytes(_png_bytes("other"))
    source = _watch(tmp_path)
    frames = source.frames()
    got = {f.path.parent.name: f for f in (next(frames) for _ in range(2))}
    source.stop()
    assert got["Ha"].metadata["target"] == "M 42" and got["Ha"].metadata["filter"] == "Ha"
    assert got["Ha"].rgb is not None
    assert got["Dark"].skipped == "calibration frame (in a 'Dark' folder)" and got["Dark"].rgb is None
    assert capture_metadata(tmp_path, tmp_path / "NGC7000" / "Light" / "x.fits") == {"target": "NGC7000"}
    assert capture_metadata(tmp_path, tmp_path / "x.fits") == {}


def test_already_done_keys_are_not_taken_again_but_a_rewritten_file_is(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_png_bytes())
    stat = path.stat()
    source = _watch(tmp_path, done={(str(path), stat.st_size, stat.st_mtime_ns)})
    assert source.poll() == [] and source.poll() == []
    time.sleep(0.01)
    path.write_bytes(_png_bytes(seed=3))
    source.poll()
    assert [p for p, _ in source.poll()] == [path]


def test_watching_a_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder to watch"):
        WatchFolder(tmp_path / "nope").open(SPEC)


def _frames_until(source, count, timeout=20):
    """The first `count` frames of a watched folder, stopping the source after `timeout` seconds at most."""
    timer = threading.Timer(timeout, source.stop)
    timer.start()
    try:
        frames = source.frames()
        got = []
        for frame in frames:
            got.append(frame)
            if len(got) == count:
                break
        frames.close()
        return got
    finally:
        timer.cancel()


def _fits_bytes() -> bytes:
    import io

    from astropy.io import fits as astrofits

    buffer = io.BytesIO()
    data = (1000 + 300 * np.random.default_rng(0).random((96, 128))).astype(np.uint16)
    astrofits.PrimaryHDU(data).writeto(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name,data", [("M42.png", _png_bytes()), ("M42.fits", _fits_bytes())])
def test_a_writer_that_pauses_between_chunks_gets_one_line_the_result(tmp_path, name, data):
    path = tmp_path / name

    def write_in_pauses():
        for i in range(0, len(data), len(data) // 3 + 1):
            with open(path, "ab") as file:  # closed between chunks, so the open-file check cannot see it
                file.write(data[i : i + len(data) // 3 + 1])
            time.sleep(0.4)  # longer than settle_s: each pause looks complete

    writer = threading.Thread(target=write_in_pauses)
    writer.start()
    source = _watch(tmp_path, settle_s=0.1, truncated_grace_s=30)  # the default: a pause never comes near it
    frames = _frames_until(source, 1)
    writer.join()
    assert [(f.error, f.rgb is not None) for f in frames] == [(None, True)]
    assert frames[0].metadata["size"] == len(data)


def test_an_empty_file_gets_a_line_once_it_has_stayed_empty(tmp_path):
    (tmp_path / "empty.fits").write_bytes(b"")
    source = _watch(tmp_path, truncated_grace_s=0.3)
    t0 = time.monotonic()
    frames = _frames_until(source, 1)
    assert [f.error for f in frames] == ["empty file (0 bytes)"]
    assert time.monotonic() - t0 >= 0.3


def test_the_same_folder_through_a_symlink_is_not_classified_again(tmp_path):
    real = tmp_path / "captures"
    real.mkdir()
    (real / "a.png").write_bytes(_png_bytes())
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    first = _watch(real)
    (frame,) = _frames_until(first, 1)
    assert frame.path == real / "a.png" and frame.rgb is not None
    again = _watch(tmp_path / "link", done=first.done)
    assert again.poll() == [] and again.poll() == []
    # A log written before keys were resolved names the file through the link: still the same capture.
    stat = (real / "a.png").stat()
    old = _watch(real, done={(str(tmp_path / "link" / "a.png"), stat.st_size, stat.st_mtime_ns)})
    assert old.poll() == [] and old.poll() == []


def test_broken_symlinks_and_fifos_in_the_folder_get_a_line_each_once(tmp_path):
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (tmp_path / "l1.jpg").symlink_to(tmp_path / "l2.jpg")
    (tmp_path / "l2.jpg").symlink_to(tmp_path / "l1.jpg")
    os.mkfifo(tmp_path / "pipe.fits")
    (tmp_path / "good.png").write_bytes(_png_bytes())
    source = _watch(tmp_path)
    frames = _frames_until(source, 5)
    by_name = {f.path.name: f for f in frames}
    assert by_name["gone.jpg"].error == "dangling symlink (its target does not exist)"
    assert by_name["l1.jpg"].error == by_name["l2.jpg"].error == "symlink loop (too many levels of symbolic links)"
    assert by_name["pipe.fits"].error == "not an image file: a FIFO (named pipe)"
    assert by_name["good.png"].rgb is not None
    assert source.poll() == [] and source.poll() == []
