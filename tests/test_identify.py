"""Know the object on every route: classify (table, jsonl, --annotate-fits), the daemon's log, the web page."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import sky_image
from test_web import browser  # noqa: F401  (the headless Chromium fixture)
from nebula.cli import cli
from nebula.device import platesolve, skycatalog
from nebula.device.config import RunConfig
from nebula.device.identify import Identifier
from nebula.device.runtime import Classifier
from nebula.device.skycatalog import CatalogEntry, SkyCatalog

M42 = (83.82208, -5.39111)


@pytest.fixture(scope="module")
def classifier(tiny_model_file):
    return Classifier(tiny_model_file, num_threads=1)


@pytest.fixture(scope="module")
def catalog_file(tmp_path_factory) -> Path:
    entries = [
        CatalogEntry(("M 42", "NGC 1976"), *M42, 85 / 60, 17, "emission", "catalog type", "Great Orion Nebula"),
        CatalogEntry(("M 43",), 83.8875, -5.2667, 20 / 60, 17, "emission", "catalog type", "de Mairan's Nebula"),
        CatalogEntry(("NGC 1999",), 84.0, 10.0, 2 / 60, 13, "reflection", "catalog type"),
    ]
    return skycatalog.write(tmp_path_factory.mktemp("catalog") / "sky.npz", entries, {"sources": {"test": "synthetic"}})


def _fits(path: Path, label="emission", **cards) -> Path:
    from astropy.io import fits

    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    cube = np.moveaxis(sky_image(label, size=64), 2, 0)  # 3 x H x W, a finished (not linear) picture
    fits.PrimaryHDU(cube, header).writeto(path)
    return path


def _wcs(ra, dec, scale_deg=1 / 120):
    return dict(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=ra, CRVAL2=dec, CRPIX1=32.5, CRPIX2=32.5,
                CD1_1=-scale_deg, CD1_2=0.0, CD2_1=0.0, CD2_2=scale_deg)


def test_identifier_reads_the_header_and_looks_the_field_up(catalog_file, tmp_path):
    identifier = Identifier(SkyCatalog.load(catalog_file))
    answer = identifier.identify(_fits(tmp_path / "m42.fits", **_wcs(*M42), OBJECT="M42"), "emission")
    assert answer.position["source"] == "header" and answer.position["target"] == "M42"
    assert answer.position["field_deg"] == pytest.approx(64 / 120, abs=1e-4)
    assert answer.catalog["main"]["designation"] == "M 42" and answer.catalog["next"][0]["designation"] == "M 43"
    assert answer.agrees is True and answer.position_note is None
    assert identifier.identify(tmp_path / "m42.fits", "reflection").agrees is False


def test_no_position_says_why_and_missing_solver_is_said(catalog_file, tmp_path, monkeypatch):
    plain = _fits(tmp_path / "plain.fits")
    answer = Identifier(SkyCatalog.load(catalog_file)).identify(plain, "emission")
    assert answer.position is None and answer.catalog is None
    assert answer.position_note == "no position in the file's header (plate solving is off: --solve)"
    monkeypatch.setattr(platesolve.shutil, "which", lambda name: None)
    unsolvable = Identifier(SkyCatalog.load(catalog_file), solve=True)
    assert unsolvable.problems() == [platesolve.unavailable_reason()]
    assert "solve-field is not installed" in unsolvable.identify(plain, "emission").position_note


def test_a_missing_catalog_file_is_one_warning_and_positions_still_come(tmp_path):
    config = RunConfig(catalog=True, catalog_file=str(tmp_path / "none.npz"))
    identifier = Identifier.from_config(config)
    assert len(identifier.problems()) == 1 and "nebula catalog build" in identifier.problems()[0]
    answer = identifier.identify(_fits(tmp_path / "a.fits", RA=M42[0], DEC=M42[1]), "emission")
    assert answer.position["ra"] == pytest.approx(M42[0]) and answer.catalog is None
    assert "catalog look-up unavailable" in answer.position_note
    assert Identifier.from_config(RunConfig()) is None


def test_classify_catalog_prints_the_catalogs_answer_beside_the_models(tiny_model_file, catalog_file, tmp_path):
    capture = _fits(tmp_path / "M42_Light_001.fits", OBJCTRA="05 35 17.3", OBJCTDEC="-05 23 28",
                    FOCALLEN=400.0, XPIXSZ=3.76)
    runner = CliRunner()
    args = ["classify", "--model", str(tiny_model_file), "--catalog-file", str(catalog_file), "--threshold", "0"]
    table = runner.invoke(cli, [*args, "--catalog", str(capture)])
    assert table.exit_code == 0, table.output
    rows = table.output.splitlines()
    assert rows[1].startswith("emission") and rows[2].startswith("  catalog: M 42 (Great Orion Nebula), HII region -> emission")
    assert "model agrees" in rows[2] and "header RA 83.822 Dec -5.391" in rows[2]
    jsonl = runner.invoke(cli, [*args, "--catalog", "--format", "jsonl", str(capture)])
    record = json.loads(jsonl.output.splitlines()[0])
    assert record["position"]["source"] == "header" and record["catalog"]["main"]["label"] == "emission"
    assert record["agrees"] is True
    plain = runner.invoke(cli, [*args, "--format", "jsonl", str(capture)])  # off by default: no new keys
    assert not {"position", "catalog", "agrees"} & set(json.loads(plain.output.splitlines()[0]))


def test_the_config_files_catalog_table_turns_it_on(tiny_model_file, catalog_file, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[catalog]\nenabled = true\nfile = "{catalog_file}"\n')
    capture = _fits(tmp_path / "c.fits", RA=M42[0], DEC=M42[1])
    result = CliRunner().invoke(cli, ["classify", "--model", str(tiny_model_file), "--config", str(config),
                                      "--format", "jsonl", str(capture)])
    assert json.loads(result.output)["catalog"]["main"]["designation"] == "M 42"
    off = CliRunner().invoke(cli, ["classify", "--model", str(tiny_model_file), "--config", str(config), "--no-catalog",
                                   "--format", "jsonl", str(capture)])
    assert "catalog" not in json.loads(off.output)


def test_annotate_fits_writes_a_copy_and_never_touches_the_original(tiny_model_file, catalog_file, tmp_path):
    from astropy.io import fits

    capture = _fits(tmp_path / "capture.fits", **_wcs(*M42))
    before = capture.read_bytes()
    out = tmp_path / "annotated"
    result = CliRunner().invoke(cli, ["classify", "--model", str(tiny_model_file), "--catalog-file", str(catalog_file),
                                      "--catalog", "--threshold", "0", "--annotate-fits", str(out), "--format", "jsonl",
                                      str(capture)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["annotated_fits"] == str(out / "capture.fits")
    assert capture.read_bytes() == before
    header = fits.getheader(out / "capture.fits")
    assert header["NEBLABEL"] == "emission" and header["NEBCATOB"] == "M 42" and header["NEBAGREE"] is True
    assert header["CRVAL1"] == pytest.approx(M42[0])  # the rest of the header is kept
    same = CliRunner().invoke(cli, ["classify", "--model", str(tiny_model_file), "--annotate-fits", str(tmp_path),
                                    "--format", "jsonl", str(capture)])
    assert "not annotated" in json.loads(same.output)["annotated_fits"] and capture.read_bytes() == before


def test_the_daemon_logs_position_and_catalog_for_captures(classifier, catalog_file, tmp_path):
    from nebula.device.camera import WatchFolder
    from nebula.device.daemon import Daemon, ResultsLog, processed_files

    watched = tmp_path / "Ekos" / "M42" / "Light"
    watched.mkdir(parents=True)
    log = tmp_path / "results.jsonl"
    source = WatchFolder(tmp_path / "Ekos", poll_s=0.02, done=processed_files(log))
    source.open(classifier.spec)
    daemon = Daemon(classifier, source, ResultsLog(log), threshold=0.0,
                    identifier=Identifier(SkyCatalog.load(catalog_file)))
    thread = threading.Thread(target=daemon.run)
    thread.start()
    _fits(watched / "M42_001.fits", **_wcs(*M42))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (log.exists() and log.read_text().strip()):
        time.sleep(0.05)
    daemon.stop()
    thread.join(5)
    daemon.log.close()
    line = json.loads(log.read_text().splitlines()[0])
    assert line["catalog"]["main"]["designation"] == "M 42" and line["position"]["source"] == "header"
    assert line["agrees"] is (line["label"] == "emission")


def test_the_web_page_answers_uploads_with_the_catalog(classifier, catalog_file, tmp_path):
    import urllib.request

    from nebula.device.web import start_server

    server = start_server(classifier, "127.0.0.1", 0, threshold=0.0, identifier=Identifier(SkyCatalog.load(catalog_file)))
    try:
        data = _fits(tmp_path / "up.fits", **_wcs(*M42)).read_bytes()
        request = urllib.request.Request(server.url + "api/classify", data=data, headers={"X-Filename": "up.fits"},
                                         method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            record = json.loads(response.read())
    finally:
        server.stop()
    assert record["file"] == "up.fits" and record["catalog"]["main"]["designation"] == "M 42"
    assert record["agrees"] is (record["label"] == "emission")


def test_the_browser_shows_the_catalogs_answer(browser, classifier, catalog_file, tmp_path):
    from nebula.device.web import LiveState, start_server

    server = start_server(classifier, "127.0.0.1", 0, state=LiveState(), threshold=0.0,
                          identifier=Identifier(SkyCatalog.load(catalog_file)))
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=server.url)
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('upload-form')")
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=root, selector="#upload-file")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(_fits(tmp_path / "m42.fits", **_wcs(*M42)))])
        browser.evaluate("document.getElementById('upload-submit').click()")
        text = browser.wait_for("!document.getElementById('upload-result').hidden && "
                                "document.getElementById('result-catalog').textContent")
    finally:
        server.stop()
    assert text.startswith("catalog: M 42 (Great Orion Nebula), HII region → emission")
    assert "[header 83.822 -5.391, field 32′]" in text


def test_run_with_catalog_in_its_config_logs_the_catalogs_answer(tiny_model_file, catalog_file, tmp_path):
    from nebula.device import daemon

    watched = tmp_path / "captures"
    watched.mkdir()
    _fits(watched / "M42_001.fits", RA=M42[0], DEC=M42[1])
    config = RunConfig(source="watch", watch_dir=str(watched), poll_s=0.05, model=str(tiny_model_file), max_frames=1,
                       log=str(tmp_path / "results.jsonl"), catalog=True, catalog_file=str(catalog_file))
    announced = []
    finished = daemon.run(config, announce=announced.append)
    assert finished.count == 1 and not any(line.startswith("warning") for line in announced)
    line = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    assert line["catalog"]["main"]["designation"] == "M 42" and line["position"]["source"] == "header"
