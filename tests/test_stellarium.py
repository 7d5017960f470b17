"""The Stellarium training set: catalogs, textures.json, labels on the real photographs, groups, merge.

The real-data tests need Debian's stellarium-data (CI installs it with apt);
they build the whole set once per module (about 10 s) and are marked slow.
"""

import csv
import gzip
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from nebula.cli import cli
from nebula.device.skycatalog import unit_vectors
from nebula.train import stellarium
from nebula.train.catalogs import CatalogError, StellariumCatalog, parse_designation, read_stellarium_catalog
from nebula.train.manifest import LABELS, grouped_split, read_manifest

SOURCE = stellarium.DEFAULT_SOURCE
needs_stellarium = pytest.mark.skipif(
    not (SOURCE / "textures.json").exists(),
    reason=f"{SOURCE} is absent: install it with 'sudo apt-get install stellarium-data' (CI does)",
)


# ------------------------------------------------------------ without Stellarium


def test_lenient_json_reads_stellarium_quirks():
    text = """{
        "subTiles" : [
        {   // a comment
            "imageCredits" : {"Short": "A. Person, with a comma,", "infoUrl": "http://x.org/a,.5]"},
            "imageUrl" : "m2.png",
            "worldCoords" : [[[323.4989,-.9794], [323.22,-.9794], [323.2201,-.6994], [323.499,-.6994],]],
            "maxBrightness" : 13.,
        },
        ],
    }"""
    data = stellarium.parse_lenient_json(text)
    tile = data["subTiles"][0]
    assert tile["worldCoords"][0][0] == [323.4989, -0.9794]
    assert tile["maxBrightness"] == 13.0
    assert tile["imageCredits"]["infoUrl"] == "http://x.org/a,.5]"  # strings are left alone


def test_read_textures_takes_short_or_Short_credit(tmp_path):
    path = tmp_path / "textures.json"
    path.write_text('{"subTiles": [{"imageCredits": {"Short": "Starhopper"}, "imageUrl": "m3.png",'
                    '"worldCoords": [[[205.8,28.1], [205.3,28.1], [205.3,28.6], [205.8,28.6]]]},'
                    '{"imageCredits": {"short": "Dumont", "infoUrl": "http://d"}, "imageUrl": "m1.png",'
                    '"worldCoords": [[[83.7,21.9], [83.5,21.9], [83.5,22.1], [83.7,22.1]]]}]}')
    m3, m1 = stellarium.read_textures(path)
    assert (m3.image, m3.credit, m1.credit, m1.info_url) == ("m3.png", "Starhopper", "Dumont", "http://d")


def test_bad_textures_json_names_the_file(tmp_path):
    path = tmp_path / "textures.json"
    path.write_text('{"subTiles": [ {"imageUrl": "a.png" "worldCoords": []} ]}')
    with pytest.raises(stellarium.StellariumError, match=r"textures\.json.*line 1"):
        stellarium.read_textures(path)


def test_footprint_contains_its_centre_and_handles_negative_ra():
    # m6.png's corners are written with negative right ascensions (-94.65 = 265.35 degrees)
    m6 = stellarium.Texture("m6.png", [(-94.6498, -32.5023), (-95.2120, -32.5211), (-95.2327, -32.0470), (-94.6735, -32.0283)])
    ra, dec = m6.centre_radec
    assert ra == pytest.approx(265.06, abs=0.02) and dec == pytest.approx(-32.27, abs=0.02)
    inside = unit_vectors(265.05, -32.25)
    outside = unit_vectors(266.5, -32.25)
    assert m6.contains(np.stack([inside, outside])).tolist() == [True, False]


@pytest.mark.parametrize("text,key", [("n7000", "NGC 7000"), ("NGC 0224", "NGC 224"), ("sh2-240", "Sh2-240"),
                                      ("barnard142", "B 142"), ("M42", "M 42"), ("u10214", "UGC 10214"),
                                      ("vdb152", "vdB 152"), ("lmc", None)])
def test_parse_designation(text, key):
    assert parse_designation(text) == key


def test_designation_group_joins_spellings_of_one_object():
    assert stellarium.designation_group("NGC7000-2") == stellarium.designation_group("ngc7000") == "ngc7000"
    assert stellarium.designation_group("sh2-240") == "sh2-240"  # its number is the designation, not a view
    assert stellarium.designation_group("IMG_0001") is None


def test_truncated_catalog_names_the_file(tmp_path):
    path = tmp_path / "catalog.dat"
    header = b"".join(len(s.encode("utf-16-be")).to_bytes(4, "big") + s.encode("utf-16-be") for s in ("3.16", "standard"))
    path.write_bytes(gzip.compress(header + b"\x00\x00\x00\x01\x40"))
    with pytest.raises(CatalogError, match=r"catalog\.dat: truncated or corrupt record"):
        read_stellarium_catalog(path)
    path.write_bytes(b"not gzip")
    with pytest.raises(CatalogError, match=r"catalog\.dat: cannot read"):
        read_stellarium_catalog(path)


def test_override_table_is_sourced_and_has_the_must_haves():
    overrides = stellarium.read_overrides()
    assert all(o.label in LABELS and len(o.source) > 20 for o in overrides.values())
    must = {"M 42": "emission", "M 8": "emission", "M 16": "emission", "M 17": "emission", "M 78": "reflection",
            "NGC 7023": "reflection", "DSO 17": "protoplanetary", "PN G218.9-11.7": "protoplanetary",
            "M 1": "supernova_remnant", "NGC 6960": "supernova_remnant", "SNR G111.7-02.1": "supernova_remnant",
            "IC 443": "supernova_remnant", "Sh2-240": "supernova_remnant"}
    assert {key: overrides[key].label for key in must} == must


def test_override_table_rejects_an_unknown_label(tmp_path):
    path = tmp_path / "overrides.csv"
    path.write_text("designation,label,source\nM 42,nebula,somewhere\n")
    with pytest.raises(stellarium.StellariumError, match=r"overrides\.csv:2: label 'nebula'"):
        stellarium.read_overrides(path)


def test_count_table_lists_every_label_and_flags_small_ones():
    rows = [stellarium.ManifestRow(file=f"emission/e{i}.png", label="emission", label_reason="x", group=f"g{i}") for i in range(25)]
    rows += [stellarium.ManifestRow(file=f"dark/crops/d{i}.png", label="dark", label_reason="x", group="g0", origin="crop")
             for i in range(3)]
    table = stellarium.count_table(rows)
    lines = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert list(lines)[:7] == list(LABELS)
    assert "small" in lines["dark"] and "small" not in lines["emission"]
    assert lines["dark"].split()[1:4] == ["0", "3", "1"]  # photos, crops, groups
    assert lines["total"].split()[1:] == ["25", "3", "25"]


def _write_user_folder(root, labels=("emission", "reflection")):
    rng = np.random.default_rng(0)
    files = {"emission": ["M42-1.jpg", "M42_2.png", "NGC7000-1.tif"], "reflection": ["witch-1.png", "witch-2.jpg"]}
    for label in labels:
        (root / label).mkdir(parents=True)
        for name in files[label]:
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(root / label / name)
    return root


def test_merge_user_folders_keeps_groups_and_sizes(tmp_path):
    first = _write_user_folder(tmp_path / "mine")
    second = tmp_path / "friend" / "emission"
    second.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(second / "m42.png")
    rows = stellarium.merge(tmp_path / "all", [first, tmp_path / "friend"])
    by_name = {r.file.rsplit("/", 1)[1]: r for r in rows}
    assert len(rows) == 6 and (tmp_path / "all" / "manifest.csv").exists()
    assert by_name["M42-1.jpg"].group == by_name["M42_2.png"].group == by_name["m42.png"].group == "m42"
    assert by_name["witch-1.png"].group == by_name["witch-2.jpg"].group == "mine/witch"
    assert (by_name["NGC7000-1.tif"].width, by_name["NGC7000-1.tif"].height) == (16, 12)
    assert read_manifest(tmp_path / "all" / "manifest.csv") == rows
    assert all((tmp_path / "all" / r.file).is_file() for r in rows)


def test_merge_rejects_a_folder_that_is_not_a_label(tmp_path):
    (tmp_path / "mine" / "galaxies").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "mine" / "galaxies" / "m31.png")
    with pytest.raises(stellarium.StellariumError, match=r"mine: sub-folders galaxies are not labels"):
        stellarium.merge(tmp_path / "all", [tmp_path / "mine"])


def test_cli_merge_prints_the_table(tmp_path):
    _write_user_folder(tmp_path / "mine")
    result = CliRunner().invoke(cli, ["data", "merge", str(tmp_path / "all"), str(tmp_path / "mine")])
    assert result.exit_code == 0, result.output
    assert "emission                3      0       2" in result.output  # photos, crops, groups
    assert "Note: dark, emission, reflection, planetary, protoplanetary, supernova_remnant, other have fewer than 20" in result.output


def test_cli_stellarium_without_data_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(stellarium, "DEFAULT_SOURCE", tmp_path / "nowhere")
    monkeypatch.setattr(stellarium, "install_stellarium_data", lambda echo: False)
    result = CliRunner().invoke(cli, ["data", "stellarium", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "sudo apt-get install -y --no-install-recommends stellarium-data" in result.output


def test_install_command_as_root_or_not_at_all(monkeypatch):
    monkeypatch.setattr(stellarium.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(stellarium.os, "geteuid", lambda: 0)
    assert stellarium.install_command() == ["apt-get", "install", "-y", "--no-install-recommends", "stellarium-data"]
    monkeypatch.setattr(stellarium.shutil, "which", lambda name: None)  # no apt-get, no sudo: the CLI prints what to run
    assert stellarium.install_command() is None


def test_cli_stellarium_with_a_wrong_source_fails_in_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["data", "stellarium", "--source", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path}: no textures.json (expected Stellarium's nebulae/default folder)"


# ------------------------------------------------------------ on the real photographs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("stellarium")
    rows = stellarium.build(SOURCE, out)
    return out, rows


@needs_stellarium
def test_stellarium_catalog_reads_every_record():
    catalog = StellariumCatalog.load(SOURCE)
    assert len(catalog.objects) > 90000
    m42 = catalog.get("NGC 1976")
    assert m42 is catalog.get("M 42") and m42.type_name == "HII region" and "Sh2-281" in m42.ids
    assert catalog.get("B 33").type_label == "dark"
    assert catalog.named("Calabash Nebula").type_name == "protoplanetary nebula"


KNOWN = {
    "m42": "emission", "m8": "emission", "m16": "emission", "m17": "emission", "n7000": "emission",
    "m57dumont": "planetary", "n7293": "planetary", "m27dumont": "planetary",
    "m1dumont": "supernova_remnant", "cassiopeia_a": "supernova_remnant", "ic443-vasey": "supernova_remnant",
    "n6960": "supernova_remnant", "sh2-240": "supernova_remnant", "velasnr": "supernova_remnant",
    "abell85": "supernova_remnant",  # listed as a planetary nebula once: the prefix rule alone would get it wrong
    "m78": "reflection", "n7023": "reflection", "ic2118-1": "reflection",
    "barnard22": "dark", "ldn1622": "dark", "darkshark-vasey": "dark",
    "calabash": "protoplanetary", "red_rectangle": "protoplanetary",
    "m31": "other", "m13": "other", "m44": "other", "lmc_07": "other", "coma_cluster": "other",
}


@needs_stellarium
@pytest.mark.slow
def test_known_objects_get_their_labels(built):
    _, rows = built
    labels = {r.file.rsplit("/", 1)[1][:-4]: r.label for r in rows}
    assert {stem: labels[stem] for stem in KNOWN} == KNOWN


@needs_stellarium
@pytest.mark.slow
def test_every_image_is_labelled_with_a_reason_and_written(built):
    out, rows = built
    assert read_manifest(out / "manifest.csv") == rows
    rows = [r for r in rows if r.origin == "photo"]  # the crops have tests of their own (test_crops.py)
    assert len(rows) == len(list(SOURCE.glob("*.png")))
    kinds = Counter(stellarium.reason_kind(r.label_reason) for r in rows)
    assert set(kinds) <= {"override", "catalog type", "catalog morphology", "catalog prefix"}
    for row in rows:
        assert row.label in LABELS and row.file.startswith(f"{row.label}/") and "identified by" in row.label_reason
        assert row.designation and row.group and row.credit
    assert set(Counter(r.label for r in rows)) == set(LABELS)  # no label dropped, however small


@needs_stellarium
@pytest.mark.slow
def test_images_are_flattened_not_resampled(built):
    out, rows = built
    by_stem = {r.file.rsplit("/", 1)[1][:-4]: r for r in rows}
    for stem in ("m1dumont", "m42", "lmc_07", "n2244"):  # with and without alpha
        row = by_stem[stem]
        original = Image.open(row.source_file)
        written = Image.open(out / row.file)
        assert written.size == original.size == (row.width, row.height)
        assert "A" not in written.mode and "transparency" not in written.info
        rgba = np.asarray(original.convert("RGBA"), dtype=float)
        expected = np.round(rgba[..., :3] * rgba[..., 3:] / 255)
        assert np.abs(np.asarray(written.convert("RGB"), dtype=float) - expected).max() <= 1


@needs_stellarium
@pytest.mark.slow
def test_views_of_one_object_share_a_group_and_splits_keep_it_whole(built):
    _, rows = built
    group = {r.file.rsplit("/", 1)[1][:-4]: r.group for r in rows}
    for family in (["barnard_loop-1", "barnard_loop-2", "barnard_loop-3", "barnard_loop-4"], ["ic2118-1", "ic2118-2"],
                   [f"lmc_{i:02d}" for i in range(1, 17)], ["smc29-1", "smc29-2", "smc29-3", "smc29-4", "smc-ha"],
                   ["rho-a00", "rho-a01", "rho-a10", "rho-a11"], ["sh2-1-1", "sh2-1-2"],
                   ["rcw53", "n3293"],  # RCW 53 is NGC 3293's nebula: one object, two file names
                   ["m8", "m20"]):  # M 20 sits inside the M 8 photograph at a comparable scale
        assert len({group[stem] for stem in family}) == 1, family
    assert group["sh2-106"] != group["sh2-132"]
    for seed in range(3):
        splits = grouped_split(rows, seed=seed)
        side = {}
        for name, members in splits.items():
            for row in members:
                assert side.setdefault(row.group, name) == name, f"group {row.group} in {side[row.group]} and {name}"
        assert sum(len(m) for m in splits.values()) == len(rows)


@needs_stellarium
@pytest.mark.slow
def test_merge_adds_user_photos_to_the_stellarium_set(built, tmp_path):
    out, rows = built
    user = _write_user_folder(tmp_path / "mine")
    merged = stellarium.merge(tmp_path / "all", [out, user], link=True)
    assert len(merged) == len(rows) + 5
    stellarium_m42 = next(r for r in merged if r.file.endswith("/m42.png"))
    user_m42 = next(r for r in merged if r.file == "emission/mine/M42-1.jpg")
    assert user_m42.group == stellarium_m42.group  # one object: never on both sides of a split
    user_n7000 = next(r for r in merged if r.file == "emission/mine/NGC7000-1.tif")
    assert user_n7000.group == next(r.group for r in merged if r.file.endswith("/n7000.png"))
    assert len({r.group for r in merged}) == len({r.group for r in rows}) + 1  # only 'witch' is new
    with open(tmp_path / "all" / "manifest.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(merged)
