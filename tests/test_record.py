"""One result record: classify, the daemon and the web page write the same thing for the same picture."""

import io
import json
import threading
import urllib.request

import pytest
from PIL import Image

from conftest import sky_image
from nebula.device.camera import WatchFolder
from nebula.device.classify import Result, ResultWriter, classify_file
from nebula.device.daemon import Daemon, ResultsLog
from nebula.device.record import CSV_COLUMNS, ResultRecord, utc_now
from nebula.device.runtime import Classifier, Prediction
from nebula.device.web import LiveState, start_server

ANSWER_KEYS = ("label", "score", "top_k", "model_sha256")


def test_to_dict_writes_what_is_set_in_order_then_the_extras():
    record = ResultRecord(frame=7, error="bad camera buffer", utc="2026-01-01T00:00:00.000Z", extras={"scene": "other"})
    assert list(record.to_dict().items()) == [("frame", 7), ("utc", "2026-01-01T00:00:00.000Z"),
                                              ("error", "bad camera buffer"), ("scene", "other")]


def test_an_answer_rounds_scores_and_takes_the_invoke_time():
    prediction = Prediction("emission", 0.912345, [("emission", 0.912345), ("other", 0.05)], {"invoke": 1.23456})
    record = ResultRecord.answer(prediction, "ab" * 32, file="M42.png").to_dict()
    assert record["score"] == 0.9123 and record["top_k"] == [["emission", 0.9123], ["other", 0.05]]
    assert record["inference_ms"] == 1.235 and record["file"] == "M42.png" and record["utc"].endswith("Z")


def test_utc_now_is_iso_utc_to_the_millisecond():
    stamp = utc_now()
    assert stamp.endswith("Z") and len(stamp) == len("2026-01-01T00:00:00.000Z")


def test_the_csv_header_is_the_record_columns():
    out = io.StringIO()
    ResultWriter("csv", "0" * 64, ["a"], 1, out=out, err=io.StringIO()).write(
        Result("x.png", error="broken"))
    assert out.getvalue().splitlines()[0].split(",") == list(CSV_COLUMNS)


@pytest.fixture(scope="module")
def classifier(tiny_model_file):
    return Classifier(tiny_model_file, num_threads=1)


def test_classify_daemon_and_web_page_agree_on_one_picture(classifier, tmp_path):
    folder = tmp_path / "captures"
    folder.mkdir()
    picture = folder / "M42.png"
    Image.fromarray(sky_image("emission", size=96, seed=5001)).save(picture)

    by_classify = classify_file(classifier, picture, top_k=2, threshold=0.5).to_record(classifier.sha256)

    source = WatchFolder(folder, poll_s=0.01, check_open_files=False)
    source.open(classifier.spec)
    daemon = Daemon(classifier, source, ResultsLog(tmp_path / "r.jsonl"), top_k=2, threshold=0.5, max_frames=1)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    runner.join(30)
    if runner.is_alive():  # the capture never came: end the loop so the test fails instead of hanging
        daemon.stop()
        runner.join(5)
    daemon.log.close()
    (by_daemon,) = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]

    server = start_server(classifier, "127.0.0.1", 0, state=LiveState(), top_k=2, threshold=0.5)
    try:
        request = urllib.request.Request(server.url + "api/classify", data=picture.read_bytes(), method="POST",
                                         headers={"X-Filename": picture.name})
        with urllib.request.urlopen(request, timeout=30) as response:
            by_web = json.loads(response.read())
    finally:
        server.stop()

    for record in (by_classify, by_daemon, by_web):
        assert {key: record[key] for key in ANSWER_KEYS} == {key: by_classify[key] for key in ANSWER_KEYS}
    assert by_daemon["file"] == by_classify["file"] == str(picture) and by_web["file"] == "M42.png"
    assert by_web["type"] == "PNG" and (by_web["width"], by_web["height"]) == (96, 96)
