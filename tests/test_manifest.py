from collections import Counter
from pathlib import Path

from nebula.train.manifest import ManifestRow, group_from_stem, grouped_split, read_manifest, write_manifest


def _rows():
    rows = []
    for label, n_groups in [("emission", 10), ("dark", 3), ("planetary", 2), ("protoplanetary", 1)]:
        for g in range(n_groups):
            for view in range(1 + g % 3):
                rows.append(ManifestRow(file=f"{label}/{label}{g}-{view}.png", label=label, label_reason="test", group=f"{label}{g}"))
    return rows


def test_group_from_stem():
    assert group_from_stem("barnard_loop-3") == "barnard_loop"
    assert group_from_stem("M42_2") == "m42"
    assert group_from_stem("ngc7000") == "ngc7000"
    assert group_from_stem("smc29-1") == "smc29"
    assert group_from_stem("IMG_0001") != group_from_stem("IMG_0002")


def test_grouped_split_keeps_groups_whole_and_covers_everything():
    rows = _rows()
    splits = grouped_split(rows, seed=3)
    seen = {}
    for split, members in splits.items():
        for row in members:
            assert seen.setdefault(row.group, split) == split, f"group {row.group} straddles splits"
    assert sorted(r.file for s in splits.values() for r in s) == sorted(r.file for r in rows)
    test_labels = Counter(r.label for r in splits["test"])
    val_labels = Counter(r.label for r in splits["val"])
    assert test_labels["emission"] and test_labels["dark"] and test_labels["planetary"]
    assert val_labels["dark"] and not val_labels["planetary"]
    assert not test_labels["protoplanetary"]  # a single group stays in train


def test_grouped_split_is_deterministic_per_seed():
    rows = _rows()
    assert grouped_split(rows, seed=1) == grouped_split(rows, seed=1)


def test_manifest_round_trip(tmp_path):
    rows = _rows()[:5]
    rows[0].width, rows[0].height, rows[0].credit = 640, 480, "Jane Doe, with a comma"
    write_manifest(rows, tmp_path / "m.csv")
    assert read_manifest(tmp_path / "m.csv") == rows


def test_data_merge_keeps_compressed_fits_and_every_other_image_format(tmp_path):
    """A folder of one's own photos in every format of the table: `nebula data merge` takes them all."""
    import gzip
    import io

    import numpy as np
    from astropy.io import fits as astrofits
    from click.testing import CliRunner
    from PIL import Image

    from nebula.cli import cli

    fits_buffer = io.BytesIO()
    astrofits.PrimaryHDU(np.random.default_rng(0).normal(1000, 30, (32, 32)).astype(np.uint16)).writeto(fits_buffer)
    own = tmp_path / "own"
    (own / "emission").mkdir(parents=True)
    (own / "emission" / "M42-1.fits.gz").write_bytes(gzip.compress(fits_buffer.getvalue()))
    (own / "emission" / "M8.fz").write_bytes(fits_buffer.getvalue())
    (own / "emission" / "M20.fit").write_bytes(fits_buffer.getvalue())
    Image.new("RGB", (32, 32), (200, 40, 40)).save(own / "emission" / "M17.png")
    (own / "emission" / "notes.txt").write_text("not an image")
    result = CliRunner().invoke(cli, ["data", "merge", str(tmp_path / "all"), str(own)])
    assert result.exit_code == 0, result.output
    rows = read_manifest(tmp_path / "all" / "manifest.csv")
    assert sorted(Path(r.file).name for r in rows) == ["M17.png", "M20.fit", "M42-1.fits.gz", "M8.fz"]
    assert {r.designation for r in rows if r.file.endswith(".fits.gz")} == {"M42-1"}  # not 'M42-1.fits'
