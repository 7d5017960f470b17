"""The device's catalog look-up: ranking on synthetic fields, the file format, and the label rules' one home."""

import math

import numpy as np
import pytest

from nebula.device import skycatalog
from nebula.device.position import SkyPosition
from nebula.device.skycatalog import CatalogEntry, CatalogFileError, SkyCatalog, agreement, disc_overlap


def _catalog(tmp_path, entries):
    path = skycatalog.write(tmp_path / "sky.npz", entries, {"sources": {"test": "synthetic"}})
    return SkyCatalog.load(path)


def _entry(name, ra, dec, size_arcmin, label="emission", type_code=17):
    return CatalogEntry(ids=(name, f"X {name}"), ra=ra, dec=dec, size_deg=size_arcmin / 60, type_code=type_code,
                        label=label, rule="catalog type", name=f"{name} Nebula")


def test_the_framed_object_wins_over_a_huge_cloud_centred_far_away(tmp_path):
    catalog = _catalog(tmp_path, [
        _entry("cloud", 12.0, 0.0, 600, label="dark", type_code=12),  # 10 deg across, centre 2 deg away: covers the frame
        _entry("target", 10.0, 0.0, 40),  # fills most of a 1 deg frame, centred
        _entry("speck", 10.1, 0.1, 1, label="other", type_code=0),
    ])
    answer = catalog.field(SkyPosition(10.0, 0.0, 1.0, 1.0))
    assert [o.designation for o in answer.objects] == ["target", "cloud", "speck"]
    assert answer.label == "emission" and answer.main.name == "target Nebula" and answer.main.other_ids == ("X target",)
    cloud = answer.objects[1]
    assert cloud.fill == pytest.approx(1.0) and cloud.score < answer.main.score


def test_a_crop_inside_a_big_nebula_is_that_nebula(tmp_path):
    catalog = _catalog(tmp_path, [_entry("big", 10.0, 0.0, 120), _entry("star", 10.25, 0.0, 0.2, "other", 28)])
    answer = catalog.field(SkyPosition(10.25, 0.0, 0.3, 0.2))  # 18' x 12', a quarter of a degree off the big one's centre
    assert answer.main.designation == "big" and answer.main.fill == pytest.approx(1.0)


def test_centrality_breaks_ties_between_equal_objects(tmp_path):
    catalog = _catalog(tmp_path, [_entry("edge", 10.4, 0.0, 10), _entry("middle", 10.05, 0.0, 10)])
    answer = catalog.field(SkyPosition(10.0, 0.0, 1.0, 1.0))
    assert [o.designation for o in answer.objects] == ["middle", "edge"]
    assert answer.objects[0].fill == pytest.approx(answer.objects[1].fill)


def test_objects_outside_the_field_are_left_out_and_ra_wraps(tmp_path):
    catalog = _catalog(tmp_path, [_entry("wrap", 359.9, 0.0, 10), _entry("far", 20.0, 0.0, 10)])
    answer = catalog.field(SkyPosition(0.1, 0.0, 1.0, 1.0))
    assert [o.designation for o in answer.objects] == ["wrap"]
    assert answer.main.offset_deg == pytest.approx(0.2, abs=1e-4)


def test_offsets_of_arcseconds_are_resolved(tmp_path):
    catalog = _catalog(tmp_path, [_entry("pn", 200.0, 60.0, 0.5, "planetary", 11)])
    answer = catalog.field(SkyPosition(200.0 + 20 / 3600 / math.cos(math.radians(60)), 60.0, 0.1, 0.1))
    assert answer.main.offset_deg * 3600 == pytest.approx(20, abs=0.5)


def test_unknown_field_assumes_one_degree_and_says_so(tmp_path):
    catalog = _catalog(tmp_path, [_entry("a", 10.0, 0.0, 30)])
    answer = catalog.field(SkyPosition(10.0, 0.0))
    assert answer.field_assumed and answer.to_record()["field_assumed_deg"] == skycatalog.DEFAULT_FIELD_DEG
    assert not catalog.field(SkyPosition(10.0, 0.0, 1.0, 1.0)).field_assumed


def test_empty_sky_and_records(tmp_path):
    catalog = _catalog(tmp_path, [_entry("a", 10.0, 0.0, 30, label=None)])
    assert catalog.field(SkyPosition(100.0, 50.0, 1.0, 1.0)).to_record() == {"main": None, "next": []}
    record = catalog.field(SkyPosition(10.0, 0.0, 1.0, 1.0)).to_record()
    assert record["main"]["designation"] == "a" and record["main"]["label"] is None and record["main"]["size_arcmin"] == 30


def test_disc_overlap_geometry():
    assert disc_overlap(np.array([1.0]), 1.0, np.array([0.0]))[0] == pytest.approx(math.pi)
    assert disc_overlap(np.array([1.0]), 1.0, np.array([2.0]))[0] == 0.0
    assert disc_overlap(np.array([0.5]), 2.0, np.array([1.0]))[0] == pytest.approx(math.pi * 0.25)
    # Two unit discs one radius apart share 2*pi/3 - sqrt(3)/2.
    assert disc_overlap(np.array([1.0]), 1.0, np.array([1.0]))[0] == pytest.approx(2 * math.pi / 3 - math.sqrt(3) / 2)


def test_agreement():
    assert agreement("emission", "emission") is True
    assert agreement("emission", "reflection") is False
    assert agreement("unknown", "emission") is None and agreement("emission", None) is None


def test_missing_and_foreign_files_are_one_line_errors(tmp_path):
    with pytest.raises(CatalogFileError, match="nebula catalog build"):
        SkyCatalog.load(tmp_path / "none.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(CatalogFileError, match="not a nebula catalog file"):
        SkyCatalog.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(CatalogFileError, match="not a readable catalog file") as err:
        SkyCatalog.load(tmp_path / "junk.npz")
    assert "\n" not in str(err.value)


def test_the_label_tables_have_one_home():
    from nebula.train import catalogs

    assert catalogs.STELLARIUM_TYPES is skycatalog.STELLARIUM_TYPES
    assert catalogs.OPENNGC_TYPES is skycatalog.OPENNGC_TYPES
    assert catalogs.PREFIX_LABELS is skycatalog.PREFIX_LABELS


def test_the_device_module_imports_no_training_code():
    import subprocess
    import sys

    code = ("import sys, nebula.device.skycatalog, nebula.device.platesolve, nebula.device.position; "
            "sys.exit(any(m.startswith(('nebula.train', 'tensorflow', 'keras', 'astropy')) for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.slow
def test_catalog_build_from_stellarium_is_small_and_knows_m42(tmp_path):
    from pathlib import Path

    from click.testing import CliRunner

    from nebula.cli import cli

    if not Path("/usr/share/stellarium/nebulae/default/catalog.dat").exists():
        pytest.skip("stellarium-data is not installed")
    pytest.importorskip("pyongc")
    out = tmp_path / "skycatalog.npz"
    result = CliRunner().invoke(cli, ["catalog", "build", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size < 5e6
    catalog = SkyCatalog.load(out)
    assert len(catalog) > 90000 and "OpenNGC" in catalog.about["sources"]["openngc"]
    answer = catalog.field(SkyPosition(83.822, -5.391, 0.55, 0.41))  # M 42 through a 400 mm refractor
    assert answer.main.designation == "M 42" and answer.main.name == "Great Orion Nebula" and answer.label == "emission"
    ring = catalog.field(SkyPosition(283.396, 33.029, 0.2, 0.15))
    assert ring.main.designation == "M 57" and ring.label == "planetary"
