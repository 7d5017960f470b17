"""Read-ahead: the next file is decoded while the model runs, in order, bounded, errors in place."""

import threading
from pathlib import Path

import pytest
from PIL import Image

from conftest import sky_image
from nebula.device import classify as classify_module
from nebula.device.classify import classify_paths
from nebula.device.prefetch import Prefetched
from nebula.device.runtime import Classifier

WAIT_S = 10  # generous: only a broken read-ahead ever waits this long


def test_items_come_in_order_and_the_worker_stays_at_most_depth_plus_one_ahead():
    made, taken = [], []

    def items():
        for i in range(20):
            made.append(i)
            yield i

    with Prefetched(items(), depth=2) as ahead:
        for item in ahead:
            taken.append(item)
            assert len(made) - len(taken) <= 3  # two ready, one being made
    assert taken == list(range(20))


def test_the_next_item_is_made_while_the_caller_still_holds_this_one():
    second_started = threading.Event()

    def items():
        yield "first"
        second_started.set()
        yield "second"

    ahead = Prefetched(items())
    assert next(ahead) == "first"
    assert second_started.wait(WAIT_S), "the worker did not start on the next item while the first was in use"
    assert list(ahead) == ["second"]


def test_an_error_is_raised_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("the third one")

    ahead = Prefetched(items())
    assert next(ahead) == 1 and next(ahead) == 2
    with pytest.raises(ValueError, match="the third one"):
        next(ahead)
    assert list(ahead) == []


def test_close_stops_an_endless_source_and_closes_it_in_the_worker():
    closed_in = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed_in.append(threading.current_thread().name)

    ahead = Prefetched(endless())
    assert [next(ahead), next(ahead)] == [0, 1]
    ahead.close()
    assert not ahead._worker.is_alive() and closed_in == ["nebula-prefetch"]
    with pytest.raises(StopIteration):
        next(ahead)


def test_classify_decodes_in_the_read_ahead_thread_and_keeps_order_and_error_lines(tiny_model_file, tmp_path, monkeypatch):
    paths = []
    for i, label in enumerate(["emission", "reflection", "other"] * 3):
        path = tmp_path / f"{i:02d}-{label}.png"
        Image.fromarray(sky_image(label, size=64, seed=40 + i)).save(path)
        paths.append(path)
    (tmp_path / "04-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths.insert(5, tmp_path / "04-broken.png")
    paths.insert(7, tmp_path / "missing.jpg")
    classifier = Classifier(tiny_model_file, num_threads=1)
    sequential = list(classify_paths(classifier, paths, prefetch=0))

    decoded_in = []
    real_load = classify_module.load_image

    def load_image(path, spec=None):
        decoded_in.append(threading.current_thread().name)
        return real_load(path, spec)

    monkeypatch.setattr(classify_module, "load_image", load_image)
    ahead = list(classify_paths(classifier, paths))
    assert set(decoded_in) == {"nebula-prefetch"} and len(decoded_in) == len(paths)
    assert [r.file for r in ahead] == [str(p) for p in paths] == [r.file for r in sequential]
    assert [(r.prediction.label, r.prediction.score) if r.prediction else r.error for r in ahead] == \
           [(r.prediction.label, r.prediction.score) if r.prediction else r.error for r in sequential]
    assert sum(r.failed for r in ahead) == 2
    assert all(set(r.timings_ms) == {"decode", "preprocess", "invoke", "postprocess", "end_to_end"} for r in ahead if r.prediction)


def test_the_watch_daemon_decodes_the_next_capture_in_the_read_ahead_thread(tiny_model_file, tmp_path, monkeypatch):
    from nebula.device import decode
    from nebula.device.camera import WatchFolder
    from nebula.device.daemon import Daemon, ResultsLog

    root = tmp_path / "captures"
    root.mkdir()
    for i in range(3):
        Image.fromarray(sky_image("emission", size=64, seed=60 + i)).save(root / f"m42_{i}.png")
    decoded_in = []
    real_load = decode.load_image

    def load_image(path, spec=None):
        decoded_in.append(threading.current_thread().name)
        return real_load(path, spec)

    monkeypatch.setattr(decode, "load_image", load_image)
    classifier = Classifier(tiny_model_file, num_threads=1)
    source = WatchFolder(root, poll_s=0.02, check_open_files=False)
    source.open(classifier.spec)
    daemon = Daemon(classifier, source, ResultsLog(tmp_path / "log.jsonl"), max_frames=3)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    thread.join(WAIT_S)
    assert not thread.is_alive() and daemon.count == 3
    assert decoded_in and set(decoded_in) == {"nebula-prefetch"}
    assert [Path(line).name for line in _logged_files(tmp_path / "log.jsonl")] == [f"m42_{i}.png" for i in range(3)]


def _logged_files(log):
    import json

    return [json.loads(line)["file"] for line in Path(log).read_text().splitlines()]
