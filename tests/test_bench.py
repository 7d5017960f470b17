"""`nebula bench` on a few small frames with the tiny model: the report's shape, never its timings."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from nebula.cli import cli
from nebula.device.bench import STAGES, synthetic_sky


def test_synthetic_sky_looks_like_a_capture():
    sky = synthetic_sky(320, 240, np.random.default_rng(0))
    assert sky.shape == (240, 320, 3) and sky.dtype == np.uint8
    background = np.median(sky)
    assert 5 < background < 60  # a dark sky...
    assert sky.max() == 255  # ...with saturated stars...
    assert sky[90:150, 120:200].mean() > background + 10  # ...and a glow near the middle
    assert sky.std() > 3  # with noise, so the JPEG decodes like a real one


def test_tiny_bench_reports_every_stage(tiny_model_file, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "--model", str(tiny_model_file), "--images", "4", "--size", "320x240",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["images"] == 4 and report["frame_size"] == [320, 240]
    assert report["camera_frame_size"] == [32, 24]  # the model's content size: what the Pi camera's lores stream delivers
    assert report["model_bytes"] == tiny_model_file.stat().st_size and report["input_size"] == 32
    assert set(report["threads"]) == {"1", "2"}
    for stats in report["threads"].values():
        for stage in STAGES:
            assert 0 < stats[stage]["median_ms"] <= stats[stage]["p90_ms"], stage
        assert stats["files_over_bare_invoke"] > 0 and stats["camera_frames_over_bare_invoke"] > 0
    memory = report["memory"]
    assert 0 < report["peak_rss_mb"] == memory["peak_rss_mb"] and report["peak_rss_device_only"] is True
    steps = [step["step"] for step in memory["steps"]]
    assert steps[:3] == ["Python", "numpy", "Pillow"] and steps[-1] == "one image classified"
    assert sum(step["added_mb"] for step in memory["steps"]) == pytest.approx(memory["steps"][-1]["rss_mb"], abs=0.1 * len(steps))
    assert memory["peak_rss_mb"] >= memory["steps"][-1]["rss_mb"] - 0.1
    # numpy alone reads a plain FITS frame: astropy (about 24 MB of imports) is left for tile-compressed .fz.
    assert memory["astropy_loaded_for_jpeg"] is False and memory["astropy_loaded_for_fits"] is False
    # Each peak is its own process's measurement: the test checks that each was taken, never how they compare.
    assert memory["fits_peak_rss_mb"] > 0 and memory["cli_peak_rss_mb"] > 0
    for words in ("decode", "per image", "camera frame", "bare invoke", "files / bare", "camera / bare", "peak RSS",
                  "model loaded", "nebula classify", "FITS"):
        assert words in result.stdout


def test_bench_without_a_model_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--model", str(tmp_path / "none.tflite"), "--images", "2"])
    assert result.exit_code == 2 and "make convert" in result.stderr


def test_bench_measures_a_fits_capture_with_the_catalog(tiny_model_file, tmp_path):
    from nebula.device import skycatalog

    catalog = skycatalog.write(tmp_path / "sky.npz", [skycatalog.CatalogEntry(("M 42",), 83.82, -5.39, 1.4, 17, "emission")], {})
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "--model", str(tiny_model_file), "--images", "2", "--size", "320x240",
                                      "--threads", "1", "--catalog-file", str(catalog), "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    memory = report["memory"]
    # The frame's header points at M 42, so the measured process really did the catalog look-up.
    assert memory["fits_catalog_main"] == "M 42" and report["catalog_file"] == str(catalog)
    assert memory["fits_peak_rss_mb"] > 0 and memory["fits_catalog_peak_rss_mb"] > 0
    assert "FITS frame with --catalog" in result.stdout and "found M 42" in result.stdout
