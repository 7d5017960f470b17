"""`nebula bench` on a few small frames with the tiny model: the report's shape, never its timings."""

import json

import numpy as np
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
    assert report["model_bytes"] == tiny_model_file.stat().st_size and report["input_size"] == 32
    assert set(report["threads"]) == {"1", "2"}
    for stats in report["threads"].values():
        for stage in (*STAGES, "bare_invoke"):
            assert 0 < stats[stage]["median_ms"] <= stats[stage]["p90_ms"], stage
        assert stats["end_to_end_over_bare_invoke"] > 0
    assert 0 < report["peak_rss_mb"] and report["peak_rss_device_only"] is True
    for words in ("decode", "bare invoke", "e2e / bare", "peak RSS"):
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
    assert 0 < report["peak_rss_fits_mb"] <= report["peak_rss_fits_catalog_mb"] and report["catalog_file"] == str(catalog)
    assert "with --catalog" in result.stdout
