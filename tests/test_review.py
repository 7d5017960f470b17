"""The review loop on the device: what is queued (once, bounded), the review API on a real server,
labelling in headless Chromium, and a crash at every step of a filing."""

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_LABELS, sky_image
from nebula.device.camera import FakeCamera, Frame, WatchFolder
from nebula.device.config import RunConfig
from nebula.device.daemon import run
from nebula.device.review import REASON_SUFFIX, NotQueued, ReviewError, ReviewQueue, read_reason, review_reason
from nebula.device.runtime import Classifier
from nebula.device.web import LiveState, start_server
from nebula.train.manifest import manifest_from_folder

ROOT = Path(__file__).resolve().parents[1]


def _record(top, **extra):
    return {"frame": 1, "label": top[0][0], "score": top[0][1], "top_k": top, "utc": "2026-12-02T01:02:03.000Z", **extra}


def _queue(tmp_path, below=0.6, gap=0.15, max_mb=50.0, every_s=0.0, lines=None):
    return ReviewQueue(tmp_path / "review", below, gap, max_mb, every_s, echo=(lines.append if lines is not None else lambda _: None))


def _frame(seed=0, label="emission"):
    return Frame(id=str(seed), rgb=sky_image(label, seed=seed))


# --- what needs a review ---------------------------------------------------------------------

@pytest.mark.parametrize("record, expected", [
    (_record([["emission", 0.9], ["reflection", 0.05]]), None),
    (_record([["emission", 0.5], ["reflection", 0.3]]), "below 0.6"),
    (_record([["emission", 0.62], ["reflection", 0.5]]), "closer than 0.15"),
    (_record([["emission", 0.9], ["reflection", 0.05]], agrees=False, catalog={"main": {"label": "reflection"}}),
     "the catalog says reflection"),
    (_record([["emission", 0.9], ["reflection", 0.05]], agrees=True), None),
    ({"frame": 3, "error": "cannot classify (bad frame)"}, None),
    ({"file": "/x/dark.fits", "skipped": "dark frame"}, None),
])
def test_review_reason(record, expected):
    reason = review_reason(record, below=0.6, gap=0.15)
    assert (reason is None) if expected is None else (expected in reason), reason


# --- the queue -------------------------------------------------------------------------------

def test_a_frame_is_queued_once_as_png_with_its_result_line(tmp_path):
    queue = _queue(tmp_path)
    record = _record([["emission", 0.4], ["other", 0.35], ["reflection", 0.25]])
    frame = _frame()
    item_id = queue.consider(record, frame)
    assert item_id and queue.consider(record, frame) is None  # the same pixels again: not queued twice
    assert queue.consider(_record([["emission", 0.95], ["other", 0.03]]), _frame(1)) is None  # confident
    [item] = queue.items()
    assert item.image.suffix == ".png" and np.array_equal(np.asarray(Image.open(item.image)), frame.rgb)
    assert item.record["result"] == record and "below" in item.record["reason"]
    # A restart remembers what was queued, even after it was filed.
    queue.file(item_id, "emission", by="ann", labels=TINY_LABELS)
    assert _queue(tmp_path).consider(record, frame) is None


def test_live_frames_are_queued_at_most_one_per_interval(tmp_path):
    queue = _queue(tmp_path, every_s=3600)
    uncertain = _record([["emission", 0.4], ["other", 0.35]])
    assert queue.consider(uncertain, _frame(0)) is not None
    assert queue.consider(uncertain, _frame(1)) is None
    capture = tmp_path / "M42.png"  # captures are each worth a look: no interval
    capture.write_bytes(b"\x89PNG\r\n\x1a\n fake bytes")
    assert queue.consider({**uncertain, "file": str(capture)}, Frame(id=str(capture), path=capture)) is not None


def test_the_queue_is_bounded_dropping_the_oldest_unlabelled_and_says_so(tmp_path):
    lines = []
    queue = _queue(tmp_path, max_mb=0.05, lines=lines)  # 52 kB: about 4 of these 12 kB PNGs
    uncertain = _record([["emission", 0.4], ["other", 0.35]])
    ids = [queue.consider(uncertain, Frame(id=str(i), rgb=np.random.default_rng(i).integers(0, 255, (64, 64, 3), np.uint8)))
           for i in range(8)]
    assert all(ids)
    kept = [item.id for item in queue.items()]
    assert 2 <= len(kept) < 8 and kept == ids[-len(kept):]  # the newest stay, in order
    total = sum(p.stat().st_size for p in queue.queue_dir.iterdir())
    assert total <= 0.05 * 2**20
    dropped = [line for line in lines if "dropped the oldest unlabelled item" in line]
    assert len(dropped) == 8 - len(kept) and ids[0] in dropped[0]
    # Skipped items go first, before older unlabelled ones.
    queue.skip(kept[-1])
    queue.consider(uncertain, Frame(id="9", rgb=np.random.default_rng(99).integers(0, 255, (64, 64, 3), np.uint8)))
    assert kept[-1] not in [item.id for item in queue.items()]
    assert any(f"dropped the oldest skipped item {kept[-1]}" in line for line in lines)


def test_items_keep_their_order_in_one_millisecond_when_the_clock_goes_back_and_across_restarts(tmp_path, monkeypatch):
    from nebula.device import review

    # A fast device stamps several items in one millisecond; a clock set by NTP or GPS can go back.
    stamps = iter(["2026-12-02T01:02:03.000Z"] * 4 + ["2026-12-02T01:02:02.000Z", "2026-12-01T23:00:00.000Z"] * 3)
    monkeypatch.setattr(review, "utc_now", lambda: next(stamps))
    uncertain = _record([["emission", 0.4], ["other", 0.35]])
    queue = _queue(tmp_path)
    ids = [queue.consider(uncertain, _frame(seed)) for seed in range(6)]
    ids += [_queue(tmp_path).consider(uncertain, _frame(seed)) for seed in range(6, 9)]  # each after a restart
    assert all(ids) and [item.id for item in _queue(tmp_path).items()] == ids


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch):
    from nebula.device import review

    lines = []
    queue = _queue(tmp_path, lines=lines)

    def no_space(path, data):
        path.with_name(review._TMP_PREFIX + path.name).write_bytes(data[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(review, "write_atomic", no_space)
    assert queue.consider(_record([["emission", 0.4], ["other", 0.35]]), _frame()) is None
    assert lines == ["review: cannot queue frame 1 (No space left on device); the run goes on"]
    assert list(queue.queue_dir.iterdir()) == []
    monkeypatch.undo()
    assert queue.consider(_record([["emission", 0.4], ["other", 0.35]]), _frame()) is not None  # not remembered as queued


def test_filing_writes_the_merge_layout_with_a_reason_file(tmp_path):
    queue = _queue(tmp_path)
    record = _record([["emission", 0.45], ["reflection", 0.4], ["other", 0.15]], target="M42", model_sha256="ab" * 32,
                     catalog={"main": {"label": "reflection"}}, agrees=False)
    item_id = queue.consider(record, _frame())
    target = queue.file(item_id, "reflection", by="ann", labels=TINY_LABELS)
    assert target == tmp_path / "review" / "labelled" / "reflection" / f"{item_id}.png"
    reason = read_reason(target)
    assert reason["label"] == "reflection" and reason["labelled_by"] == "ann" and reason["labelled_utc"].endswith("Z")
    assert reason["model"]["label"] == "emission" and reason["model"]["top_k"][0] == ["emission", 0.45]
    assert reason["catalog"] == "reflection" and reason["target"] == "M42"
    assert queue.items() == [] and list(queue.queue_dir.iterdir()) == []
    # The labelled folder is a dataset as it is; reason files are not taken for images.
    rows = manifest_from_folder(tmp_path / "review" / "labelled")
    assert [(r.file, r.label) for r in rows] == [(f"reflection/{item_id}.png", "reflection")]
    with pytest.raises(NotQueued):
        queue.file(item_id, "other", labels=TINY_LABELS)
    with pytest.raises(ReviewError, match="not one of the model's labels"):
        queue.file(queue.consider(record, _frame(5)), "galaxy", labels=TINY_LABELS)


def test_not_deep_sky_is_kept_out_of_the_labelled_folder(tmp_path):
    queue = _queue(tmp_path)
    item_id = queue.consider(_record([["other", 0.4], ["emission", 0.35]]), _frame())
    target = queue.file(item_id, None, by="ann", labels=TINY_LABELS)
    assert target.parent == tmp_path / "review" / "not_deep_sky" and read_reason(target)["label"] is None
    assert manifest_from_folder(tmp_path / "review" / "labelled") == []


# --- the daemon feeds it: fake camera and watch folder ----------------------------------------

def _config(tmp_path, model, **fields):
    # review_below 1.0: every answer of the confident tiny model counts as uncertain.
    return RunConfig(log=str(tmp_path / "results.jsonl"), model=str(model), review_below=1.0, review_every_s=0.0, max_fps=0,
                     **fields)


def test_fake_camera_frames_reach_the_queue_once(tiny_model_file, tmp_path):
    config = _config(tmp_path, tiny_model_file, source="fake", max_frames=30)
    run(config, source=FakeCamera(hold=5, variants=2), announce=lambda line: None)
    queue = ReviewQueue.from_config(config)
    items = queue.items()
    # 3 scenes x 2 variants are the only distinct pictures among the 30 frames: each is queued once.
    assert len(items) == 6
    assert len({item.record["result"]["frame"] for item in items}) == 6
    assert {item.record["result"]["scene"] for item in items} == {"emission", "reflection", "other"}
    assert all(item.image.suffix == ".png" for item in items)


def test_watch_folder_captures_reach_the_queue_once_also_across_a_restart(tiny_model_file, tmp_path):
    captures = tmp_path / "Ekos" / "M42" / "Light" / "Ha"
    captures.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(sky_image("emission", seed=i)).save(captures / f"M42_Light_{i:03d}.png")
    config = _config(tmp_path, tiny_model_file, source="watch", watch_dir=str(tmp_path / "Ekos"), max_frames=3, poll_s=0.05)
    watch = lambda: WatchFolder(config.watch_dir, poll_s=0.05, check_open_files=False)  # noqa: E731
    run(config, source=watch(), announce=lambda line: None)
    queue = ReviewQueue.from_config(config)
    items = queue.items()
    assert len(items) == 3 and all(item.record["result"]["target"] == "M42" for item in items)
    for item in items:  # the capture's own bytes
        assert item.image.read_bytes() == Path(item.record["result"]["file"]).read_bytes()
    # Without the log's memory the watcher classifies them again: the queue still holds each once.
    (tmp_path / "results.jsonl").unlink()
    run(config, source=watch(), announce=lambda line: None)
    assert len(ReviewQueue.from_config(config).items()) == 3


# --- the review API on a real server ----------------------------------------------------------

@pytest.fixture(scope="module")
def classifier(tiny_model_file):
    return Classifier(tiny_model_file, num_threads=1)


SCENES = ["emission", "reflection", "other", "emission", "other"]


@pytest.fixture
def review_server(classifier, tmp_path):
    queue = _queue(tmp_path)
    catalog = {1: {"catalog": {"main": {"label": "emission"}}, "agrees": False}}  # where the record knows the position
    ids = [queue.consider(_record([[label, 0.4], ["other", 0.35], ["reflection", 0.25]], **catalog.get(i, {})), _frame(i, label))
           for i, label in enumerate(SCENES)]
    server = start_server(classifier, "127.0.0.1", 0, state=LiveState(), review=queue)
    yield server, queue, ids
    server.stop()


def _post(url, payload, content_type="application/json"):
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_review_api_lists_serves_and_files(review_server):
    server, queue, ids = review_server
    listing = json.loads(urllib.request.urlopen(server.url + "api/review", timeout=30).read())
    assert listing["enabled"] and listing["labels"] == TINY_LABELS and [i["id"] for i in listing["items"]] == ids
    assert listing["items"][0]["top3"][0] == ["emission", 0.4] and listing["items"][0]["source"] == "frame 1"
    with urllib.request.urlopen(server.url + listing["items"][0]["image"].lstrip("/"), timeout=30) as response:
        assert response.headers["Content-Type"] == "image/png" and response.read() == queue.get(ids[0]).image.read_bytes()
    assert _post(server.url + f"api/review/{ids[0]}", {"action": "label", "label": "emission", "by": "ann"}) == \
        (200, {"filed": f"labelled/emission/{ids[0]}.png"})
    assert _post(server.url + f"api/review/{ids[0]}", {"action": "label", "label": "emission"})[0] == 404
    assert _post(server.url + f"api/review/{ids[1]}", {"action": "label", "label": "galaxy"})[0] == 400
    assert _post(server.url + f"api/review/{ids[1]}", {"action": "dance"})[0] == 400
    assert _post(server.url + f"api/review/{ids[1]}", {"action": "skip"}, content_type="text/plain")[0] == 415
    assert _post(server.url + "api/review/..%2f..%2fetc", {"action": "skip"})[0] == 404
    with urllib.request.urlopen(server.url + "review", timeout=30) as response:
        assert b"review.js" in response.read()


# --- a real browser -----------------------------------------------------------------------------

from test_web import browser  # noqa: E402,F401 - the DevTools client and its Chromium fixture


def test_browser_labels_three_images_and_they_are_on_disk(browser, review_server):  # noqa: F811
    server, queue, ids = review_server
    browser.call("Page.enable")
    browser.call("Page.navigate", url=server.url + "review")
    browser.wait_for("document.querySelectorAll('#review-items li').length === 5")
    assert browser.evaluate("document.getElementById('review-status').textContent") == "5 to review"
    shown = json.loads(browser.evaluate("JSON.stringify([...document.querySelectorAll('#review-items li')].map(li => "
                                        "[li.dataset.id, li.querySelector('.top3').textContent, li.querySelector('img').naturalWidth]))"))
    assert [s[0] for s in shown] == ids and shown[0][1] == "model: emission 40.0 %, other 35.0 %, reflection 25.0 %"
    assert browser.evaluate("[...document.querySelectorAll('#review-items .catalog')].map(p => p.textContent).join('|')") == \
        "catalog: emission (disagrees with the model)"
    browser.wait_for("[...document.querySelectorAll('#review-items img')].every(i => i.complete && i.naturalWidth === 64)")
    browser.evaluate("document.getElementById('labeller').value = 'ann'")

    def press(key):
        browser.call("Input.dispatchKeyEvent", type="keyDown", key=key, text=key)
        browser.call("Input.dispatchKeyEvent", type="keyUp", key=key)

    # One click files the first item; keys file the next ones (2 = reflection, n = not deep-sky, s = skip).
    browser.evaluate("document.querySelector('#review-items li.current .actions button').click()")
    browser.wait_for("document.getElementById('review-status').textContent === '4 to review'")
    press("2")
    browser.wait_for("document.getElementById('review-status').textContent === '3 to review'")
    press("3")
    browser.wait_for("document.getElementById('review-status').textContent === '2 to review'")
    press("n")
    browser.wait_for("document.getElementById('review-status').textContent === '1 to review'")
    press("s")
    browser.wait_for("document.getElementById('review-status').textContent === 'nothing to review'")
    assert browser.evaluate("document.getElementById('review-error').hidden")

    root = queue.root
    for item_id, label in zip(ids[:3], ["emission", "reflection", "other"]):
        image = root / "labelled" / label / f"{item_id}.png"
        assert np.array_equal(np.asarray(Image.open(image)), sky_image(SCENES[ids.index(item_id)], seed=ids.index(item_id)))
        reason = read_reason(image)
        assert reason["label"] == label and reason["labelled_by"] == "ann" and reason["model"]["score"] == 0.4
    assert read_reason(root / "labelled" / "reflection" / f"{ids[1]}.png")["catalog"] == "emission"
    rejected = root / "not_deep_sky" / f"{ids[3]}.png"
    assert rejected.is_file() and read_reason(rejected)["label"] is None and read_reason(rejected)["labelled_by"] == "ann"
    assert sorted(p.name for p in (root / "labelled").rglob("*.png")) == sorted(f"{i}.png" for i in ids[:3])
    assert [item.id for item in queue.items()] == [ids[4]] and queue.items()[0].record["skipped"] is True
    # After a reload the skipped one is still there, marked.
    browser.call("Page.reload")
    browser.wait_for("document.querySelectorAll('#review-items li.skipped').length === 1")


# --- a crash at every step of a filing ---------------------------------------------------------

_CRASH = textwrap.dedent("""
    import os, sys
    from nebula.device import review
    root, item_id, crash_at, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    steps = {"n": 0}
    real_replace, real_write = os.replace, review.write_atomic

    def step():
        steps["n"] += 1
        if steps["n"] == crash_at:
            os._exit(9)  # a power cut: no cleanup, no finally

    def replace(src, dst):
        step()
        real_replace(src, dst)

    def half_written(path, data):  # dies with half the bytes in the temporary file
        tmp = path.with_name(review._TMP_PREFIX + path.name)
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
        step()
        real_write(path, data)

    real_unlink = review.Path.unlink

    def unlink(self, missing_ok=False):
        step()
        real_unlink(self, missing_ok=missing_ok)

    os.replace = replace
    review.Path.unlink = unlink
    if mode == "half":
        review.write_atomic = half_written
    queue = review.ReviewQueue(root, 0.6, 0.15, 50.0)
    queue.file(item_id, "emission", by="ann", labels=["emission", "reflection", "other"])
    print("done")
""")


# Steps of a filing: 1 the reason file moves in, 2 the image moves, 3 the queue record goes; "half": the reason
# file's temporary copy is half written when the power goes.
@pytest.mark.parametrize("crash_at, mode", [(1, "replace"), (2, "replace"), (3, "replace"), (1, "half"), (99, "replace")])
def test_a_crash_while_filing_leaves_the_old_or_the_new_state(tmp_path, crash_at, mode):
    queue = _queue(tmp_path)
    frame = _frame(3)
    item_id = queue.consider(_record([["emission", 0.4], ["other", 0.35]]), frame)
    before = queue.get(item_id).image.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _CRASH, str(queue.root), item_id, str(crash_at), mode],
                            capture_output=True, text=True, env=env, timeout=60)
    finished = crash_at == 99
    assert result.returncode == (0 if finished else 9), result.stderr
    reopened = _queue(tmp_path)  # opening tidies what the crash left
    files = sorted(p.relative_to(reopened.root).as_posix() for p in reopened.root.rglob("*") if p.is_file())
    labelled = reopened.root / "labelled" / "emission" / f"{item_id}.png"
    old = [f"queue/{item_id}.json", f"queue/{item_id}.png", "seen.txt"]
    new = [f"labelled/emission/{item_id}.png", f"labelled/emission/{item_id}.png{REASON_SUFFIX}", "seen.txt"]
    assert files in (old, new), files
    if files == new:
        assert labelled.read_bytes() == before and read_reason(labelled)["labelled_by"] == "ann"
    else:
        assert reopened.get(item_id).image.read_bytes() == before and [i.id for i in reopened.items()] == [item_id]
    # Which state each crash point gives: the image moves with the second rename.
    assert (files == new) == (finished or crash_at > 2)


def test_nebula_run_queues_with_the_review_settings_of_its_config_file(tiny_model_file, tmp_path):
    from click.testing import CliRunner

    from nebula.cli import cli

    config = tmp_path / "config.toml"
    config.write_text("[review]\nbelow = 1.0\nevery_s = 0.0\nmax_mb = 5\n")
    common = ["run", "--source", "fake", "--max-frames", "8", "--max-fps", "0", "--model", str(tiny_model_file),
              "--log", str(tmp_path / "results.jsonl"), "--config", str(config)]
    result = CliRunner().invoke(cli, [*common, "--review-dir", str(tmp_path / "mine")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "mine" / "queue").glob("*.png"))) == 4  # 8 frames of one scene: its 4 distinct pictures
    result = CliRunner().invoke(cli, [*common, "--no-review"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "review").exists()


def _serve_review_listing(args, env):
    """Start `nebula serve ARGS` in its own process and return its GET /api/review; SIGTERM it after."""
    import queue as queue_module
    import signal
    import threading
    import time

    process = subprocess.Popen([sys.executable, "-m", "nebula", "serve", "--port", "0", *args], cwd=ROOT, env=env,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = queue_module.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        url, said, deadline = None, [], time.monotonic() + 60
        while url is None and time.monotonic() < deadline and (process.poll() is None or not lines.empty()):
            try:
                said.append(lines.get(timeout=0.5))
            except queue_module.Empty:
                continue
            if said[-1].startswith("web page:"):
                url = said[-1].split()[-1]
        assert url, f"the web page did not start: {''.join(said)}"
        with urllib.request.urlopen(url + "api/review", timeout=30) as response:
            listing = json.loads(response.read())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        return listing
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("how", ["flag", "config file"])
def test_nebula_serve_finds_the_queue_that_nebula_run_review_dir_made(tiny_model_file, tmp_path, how):
    from click.testing import CliRunner

    from nebula.cli import cli

    mine = tmp_path / "mine"
    config = tmp_path / "config.toml"
    config.write_text(f"[review]\nbelow = 1.0\nevery_s = 0.0\n" + (f"dir = {json.dumps(str(mine))}\n" if how == "config file" else ""))
    review_dir = ["--review-dir", str(mine)] if how == "flag" else []
    result = CliRunner().invoke(cli, ["run", "--source", "fake", "--max-frames", "4", "--max-fps", "0", "--model", str(tiny_model_file),
                                      "--log", str(tmp_path / "logs" / "results.jsonl"), "--config", str(config), *review_dir])
    assert result.exit_code == 0, result.output
    queued = sorted(p.stem for p in (mine / "queue").glob("*.png"))
    assert queued
    # serve's own log would be elsewhere (here: none beside a fresh XDG_STATE_HOME), so only the review folder can lead it there
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    listing = _serve_review_listing(["--model", str(tiny_model_file), "--config", str(config), *review_dir], env)
    assert listing["enabled"] and sorted(item["id"] for item in listing["items"]) == queued
