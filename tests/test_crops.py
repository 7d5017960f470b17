"""Catalog-guided crops: sky-to-pixel geometry on a synthetic footprint, the rules, their groups, and (slow) the real set's groups."""

import math

import numpy as np
import pytest

from nebula.train import crops, stellarium
from nebula.train.catalogs import Dso, StellariumCatalog
from nebula.train.crossval import assign_folds, fold_rows, photographer
from nebula.train.fit import TrainConfig, split_with_crops
from nebula.train.manifest import ManifestRow

SOURCE = stellarium.DEFAULT_SOURCE
needs_stellarium = pytest.mark.skipif(not (SOURCE / "textures.json").exists(),
                                      reason=f"{SOURCE} is absent: install stellarium-data (CI does)")


def _footprint(ra=100.0, dec=20.0, half=0.5):
    """A north-up, east-left 1 x 1 degree footprint in textures.json's corner order (SE, SW, NW, NE)."""
    k = 1 / math.cos(math.radians(dec))
    corners = [(ra + half * k, dec - half), (ra - half * k, dec - half), (ra - half * k, dec + half), (ra + half * k, dec + half)]
    return stellarium.Texture("synthetic.png", corners, "A. Photographer")


def _xyz(ra, dec):
    ra, dec = math.radians(ra), math.radians(dec)
    return np.array([math.cos(dec) * math.cos(ra), math.cos(dec) * math.sin(ra), math.sin(dec)])


def test_sky_positions_land_where_a_north_up_east_left_photo_shows_them():
    footprint = crops.Footprint(_footprint(), 400, 400)
    (cx, cy), = footprint.pixels(_xyz(100.0, 20.0))
    assert abs(cx - 200) < 1 and abs(cy - 200) < 1  # centre
    (nx, ny), = footprint.pixels(_xyz(100.0, 20.4))
    assert abs(nx - 200) < 2 and abs(ny - 40) < 3  # 0.4 deg north: up, 160 px at 400 px per degree
    (ex, ey), = footprint.pixels(_xyz(100.0 + 0.3 / math.cos(math.radians(20)), 20.0))
    assert abs(ex - 80) < 3 and abs(ey - 200) < 3  # 0.3 deg east: left
    assert footprint.deg_per_px == pytest.approx(1 / 400, rel=0.01)


def test_pixels_map_back_to_the_sky():
    texture = _footprint()
    footprint = crops.Footprint(texture, 400, 300)
    pixels = np.array([[0, 0], [400, 300], [123.4, 56.7], [200, 150]])
    np.testing.assert_allclose(footprint.pixels(footprint.sky(pixels)), pixels, atol=1e-6)
    # The whole photo as a window gives back the footprint's corners, in textures.json's order.
    np.testing.assert_allclose(footprint.window_corners((0, 0, 400, 300)), texture.corners, atol=1e-9)


def _photo(stem, ra, dec, half, group):
    texture = stellarium.Texture(f"{stem}.png", _footprint(ra, dec, half).corners, f"Photographer of {stem}")
    return stellarium.Labelled(texture, "emission", "test", stem, group)


def test_a_crop_joins_the_group_of_another_photo_of_its_sky_at_a_comparable_scale():
    source = _photo("source", 100.0, 20.0, 0.5, "gsource")  # 1 x 1 degree, 400 x 400 px: 400 px a degree
    box = (260, 60, 340, 140)  # 0.2 degree square, centred 0.25 degree west and north of the photo's centre
    window = crops.Footprint(source.texture, 400, 400).window_corners(box)
    crop = crops.Crop("NGC 5", "emission", "test", box, 1.4, 57.0, window)
    ra, dec = 100.0 - 0.25 / math.cos(math.radians(20)), 20.25  # the window's centre on the sky
    same_sky = _photo("same_sky", ra, dec, 0.15, "gsame")  # radius 0.21 degree against the window's 0.14: comparable
    far = _photo("far", 150.0, 20.0, 0.15, "gfar")
    wide = _photo("wide", ra, dec, 2.0, "gwide")  # the window's sky too, but 20 times wider
    tiny = _photo("tiny", ra, dec, 0.01, "gtiny")  # and 10 times narrower
    assert stellarium.Texture("", list(window)).radius == pytest.approx(0.1 * math.sqrt(2), rel=0.02)

    labelled = [source, same_sky, far, wide, tiny]
    groups = stellarium.join_crop_groups(labelled, [(source, crop)])
    assert groups == [source.group] and source.group == same_sky.group
    assert len({source.group, far.group, wide.group, tiny.group}) == 4
    assert (far.group, wide.group, tiny.group) == ("gfar", "gwide", "gtiny")

    # The same crop cut far from the other photo's sky joins nothing but its photo and object.
    source, same_sky = _photo("source", 100.0, 20.0, 0.5, "gsource"), _photo("same_sky", ra, dec, 0.15, "gsame")
    elsewhere = crops.Crop("NGC 5", "emission", "test", (0, 320, 80, 400),
                           1.4, 57.0, crops.Footprint(source.texture, 400, 400).window_corners((0, 320, 80, 400)))
    assert stellarium.join_crop_groups([source, same_sky], [(source, elsewhere)]) == ["gsource"]
    assert same_sky.group == "gsame"


def _catalog(*objects):
    return StellariumCatalog(list(objects))


def _dso(number, ra, dec, type_code, size, ids):
    return Dso(number, ra, dec, type_code, "", size, ids)


def _sky(size=400, dark_at=None, radius=0):
    rng = np.random.default_rng(0)
    lum = rng.normal(60, 5, (size, size)).astype(np.float32)
    if dark_at:
        yy, xx = np.mgrid[0:size, 0:size]
        lum[np.hypot(xx - dark_at[0], yy - dark_at[1]) <= radius] = 15
    return np.clip(lum, 0, 255)


def _label_of(obj):
    return (obj.type_label, f"catalog type: {obj.type_name}") if obj.type_label else None


def test_a_catalogued_object_lands_inside_its_crop():
    # A dark cloud 0.1 deg across (40 px), 0.2 deg north-west of centre: pixel (200 + 80, 200 - 80)... west is right.
    ra = 100.0 - 0.2 / math.cos(math.radians(20))
    cloud = _dso(1, ra, 20.2, 12, 0.1, ("B 999",))
    lum = _sky(dark_at=(280, 120), radius=20)
    planned, dropped = crops.plan_crops(_footprint(), lum, None, "other", _catalog(cloud), _label_of)
    assert planned and not dropped
    for crop in planned:
        left, top, right, bottom = crop.box
        assert left <= 280 < right and top <= 120 < bottom, crop
        assert crop.label == "dark" and crop.designation == "B 999"
        assert right - left == pytest.approx(40 * crop.framing, abs=2)


def test_a_dark_cloud_that_is_not_darker_than_its_surroundings_is_dropped():
    cloud = _dso(1, 100.0, 20.0, 12, 0.1, ("B 998",))
    planned, dropped = crops.plan_crops(_footprint(), _sky(), None, "other", _catalog(cloud), _label_of)
    assert not planned and [d.rule for d in dropped] == ["not-dark"]


def test_nebula_inside_the_galaxy_a_photo_is_of_is_dropped():
    galaxy = _dso(1, 100.0, 20.0, 0, 0.6, ("NGC 1",))
    knot = _dso(2, 100.0, 20.05, 17, 0.12, ("NGC 2",))  # an H II region inside the galaxy's disk
    planned, dropped = crops.plan_crops(_footprint(), _sky(), galaxy, "other", _catalog(galaxy, knot), _label_of)
    assert not planned and [(d.designation, d.rule) for d in dropped] == [("NGC 2", "inside-other")]


def test_small_objects_and_empty_windows_give_no_crop():
    tiny = _dso(1, 100.0, 20.0, 17, 0.05, ("NGC 3",))  # 20 px: below MIN_OBJECT_PX
    assert crops.plan_crops(_footprint(), _sky(), None, "other", _catalog(tiny), _label_of) == ([], [])
    black = np.zeros((400, 400), np.float32)
    bigger = _dso(2, 100.0, 20.0, 17, 0.15, ("NGC 4",))
    planned, dropped = crops.plan_crops(_footprint(), black, None, "other", _catalog(bigger), _label_of)
    assert not planned and {d.rule for d in dropped} == {"empty"}


def _row(file, label, group, credit, origin="photo"):
    return ManifestRow(file=file, label=label, label_reason="test", group=group, credit=credit, origin=origin)


def test_crops_train_only_and_never_beside_their_group():
    rows = [_row(f"{label}/p{i}.png", label, f"g{label}{i}", f"C{i % 4}") for label in ("emission", "dark", "other")
            for i in range(12)]
    rows += [_row(f"dark/crops/p{i}__x.png", "dark", f"gemission{i}", f"C{i % 4}", "crop") for i in range(12)]
    splits = split_with_crops(rows, TrainConfig(data="", out=""))
    held = {r.group for s in ("val", "test") for r in splits[s]}
    assert all(r.origin == "photo" for s in ("val", "test") for r in splits[s])
    in_train = [r for r in splits["train"] if r.origin == "crop"]
    assert in_train and all(r.group not in held for r in in_train)
    assert len(in_train) == sum(1 for r in rows if r.origin == "crop" and r.group not in held)
    assert not [r for r in split_with_crops(rows, TrainConfig(data="", out="", crops=False))["train"] if r.origin == "crop"]


def test_photographer_folds_hold_out_whole_photographers_and_their_objects():
    rows = [_row(f"emission/p{i}.png", "emission", f"g{i % 7}", f"Person {i % 9} <http://x/{i}>") for i in range(60)]
    rows += [_row(f"dark/crops/c{i}.png", "dark", f"g{i % 7}", f"Person {i % 9}", "crop") for i in range(10)]
    assert photographer(rows[0]) == "Person 0"
    fold_of = assign_folds([r for r in rows if r.origin == "photo"], folds=3)
    assert sorted(set(fold_of.values())) == [0, 1, 2]
    scored = []
    for k in range(3):
        train, test = fold_rows(rows, fold_of, k)
        test_people = {photographer(rows[i]) for i in test}
        test_groups = {rows[i].group for i in test}
        assert all(rows[i].origin == "photo" for i in test)
        for i in train:
            assert photographer(rows[i]) not in test_people and rows[i].group not in test_groups
        scored += test
    assert sorted(scored) == [i for i, r in enumerate(rows) if r.origin == "photo"]  # every photo scored once


@needs_stellarium
@pytest.mark.slow
def test_real_crops_keep_photos_and_objects_on_one_side(tmp_path):
    rows = stellarium.build(SOURCE, tmp_path / "set")
    crops_rows = [r for r in rows if r.origin == "crop"]
    photos = {r.source_file.rsplit("/", 1)[-1]: r for r in rows if r.origin == "photo"}
    assert len(crops_rows) > 100
    assert {r.label for r in crops_rows} >= {"dark", "emission", "reflection", "planetary"}
    for r in crops_rows:
        assert r.group == photos[r.source_file].group  # a crop is in its photo's group
        assert r.label_reason.startswith("catalog crop:") and r.credit == photos[r.source_file].credit
        assert (tmp_path / "set" / r.file).exists()
    by_object = {}
    for r in crops_rows:  # one object cut from several photos: one group
        assert by_object.setdefault(r.designation, r.group) == r.group, r.designation
    # A crop showing another photographer's photo's sky at a comparable scale joins that photo's group (issue 11) ...
    by_file = {r.file: r for r in rows}
    for crop, photo in (("emission/crops/etaCarinae__ic2599__x1.4.png", "rcw53"), ("emission/crops/etaCarinae__ic2599__x2.2.png", "rcw53"),
                        ("emission/crops/GammaCygni-vasey__lbn267__x2.2.png", "n6914")):
        assert by_file[crop].group == photos[f"{photo}.png"].group, crop
    # ... but rho-a11 (vdB 104 among its crops) stays apart from M 4, whose footprint lies outside it.
    assert photos["rho-a11.png"].group != photos["m4.png"].group
    assert (tmp_path / "set" / "crops_dark.png").exists() and (tmp_path / "set" / "crops_dropped.csv").exists()


def test_crossval_command_runs_end_to_end_on_tiny_skies(tmp_path, monkeypatch):
    """nebula crossval on generated skies: every photo scored once, the JSON and the PNG written, the cache reused."""
    import json

    from click.testing import CliRunner
    from conftest import write_sky_folder

    from nebula.cli import cli
    from nebula.train import crossval
    from nebula.train.manifest import load_dataset, write_manifest

    monkeypatch.setattr(crossval, "FEATURE_CACHE", tmp_path / "cache")
    data = write_sky_folder(tmp_path / "sky", per_label=12, size=48)
    rows = load_dataset(data)
    groups = sorted({row.group for row in rows})
    for row in rows:  # one photographer per object group, six photographers
        person = groups.index(row.group) % 6
        row.credit = f"Photographer {person} <http://example.org/{person}>"
    write_manifest(rows, data / "manifest.csv")
    args = ["crossval", "--data", str(data), "--out", str(tmp_path / "cv"), "--backbone", "tiny", "--folds", "3",
            "--views", "2", "--repeats", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "cv" / "crossval.json").read_text())
    assert record["photographs"] == len(rows) and record["photographers"] == 6
    assert sum(f["test_images"] for f in record["folds"]) == len(rows)
    assert record["repeats"]["n"] == 2 and len(record["repeats"]["macro_f1"]["values"]) == 2
    assert (tmp_path / "cv" / "crossval_confusion.png").stat().st_size > 0
    assert "Leave-photographers-out" in result.output and "over 2 repeats" in result.output
    again = CliRunner().invoke(cli, args)  # the features come from the cache the first run wrote
    assert again.exit_code == 0 and "computing features" not in again.output
    assert json.loads((tmp_path / "cv" / "crossval.json").read_text())["macro_f1"] == record["macro_f1"]
    oof = record["out_of_fold"]  # every photo's answer per repeat, for crossval-compare
    assert len(oof["files"]) == len(rows) and len(oof["predicted"]) == 2 and len(set(oof["photographers"])) == 6
    itself = CliRunner().invoke(cli, ["crossval-compare", str(tmp_path / "cv"), str(tmp_path / "cv"), "--resamples", "200",
                                      "--json", str(tmp_path / "compare.json")])
    assert itself.exit_code == 0, itself.output
    compared = json.loads((tmp_path / "compare.json").read_text())
    assert compared["macro_f1"]["a"] == pytest.approx(record["repeats"]["macro_f1"]["values"])  # the same scorer
    assert compared["macro_f1"]["difference_mean"] == 0 and "B ahead in 0.0% of draws" in itself.output
    too_many = CliRunner().invoke(cli, [*args[:8], "12", *args[9:]])  # 12 folds of 6 photographers: some fold is empty
    assert too_many.exit_code == 1 and "too few photographers or object groups" in too_many.output


def test_crossval_fine_tuning_starts_every_fold_from_the_same_top(tmp_path, monkeypatch):
    """--unfreeze: the bottom's output is cached, the top units move on a fold, and the next fold starts from the same
    (snapped) weights again, so no fold inherits what another fold's photographers taught it."""
    import keras

    from conftest import write_sky_folder

    from nebula.train import backbones, crossval, int8_grid
    from nebula.train.fit import make_deterministic, ordered_labels
    from nebula.train.manifest import load_dataset

    monkeypatch.setattr(crossval, "FEATURE_CACHE", tmp_path / "cache")
    data = write_sky_folder(tmp_path / "sky", per_label=6, size=48)
    rows = load_dataset(data)
    labels = ordered_labels(rows)
    config = crossval.CrossvalConfig(data=str(data), out=str(tmp_path / "cv"), backbone="tiny", views=2, unfreeze=1,
                                     epochs=20, patience=20, finetune_lr=1e-2, dropout=0.0)
    make_deterministic(0)
    spec = backbones.get("tiny").preprocess
    rows, maps = crossval._view_features(rows, data, spec, labels, config, lambda line: None)
    assert maps.ndim == 5 and maps.shape[:2] == (len(rows), 2)  # (images, views, H, W, C): the bottom's output
    top = crossval._FineTunableTop(config, maps.shape[2:])
    assert top.pooled(maps).shape == (len(rows), 2, 32)  # tiny's head has 32 channels
    start = [w.copy() for layer in top.layers for w in layer.get_weights()]

    truth = np.array([labels.index(r.label) for r in rows], np.int32)
    everyone = list(range(len(rows)))  # validated on its own training images, so fine-tuning surely finds a better epoch
    y = np.repeat(truth, 2)
    classifier = keras.layers.Dense(len(labels), activation="softmax")
    classifier.build((None, 32))
    head_start = [np.zeros_like(w) for w in classifier.get_weights()]  # every photo "dark" at first: any learning scores higher

    def one_fold():
        keras.utils.set_random_seed(1)
        classifier.set_weights(head_start)
        model = top.fine_tune(classifier, maps, everyone, everyone, y, np.ones(len(y), np.float32), truth, labels, 0)
        return model.predict(maps[:, 0], verbose=0), [w.copy() for layer in top.layers for w in layer.get_weights()]

    first_probs, tuned = one_fold()
    assert any(not np.array_equal(a, b) for a, b in zip(start, tuned))  # the top units were trained
    assert int8_grid.max_offset(top.backbone) < 1e-3  # and rounded back onto the int8 grid, as nebula train does
    second_probs, tuned_again = one_fold()
    np.testing.assert_allclose(second_probs, first_probs, atol=1e-5)  # same start, same answer: the top was reset
    for a, b in zip(tuned, tuned_again):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_crossval_unfreeze_scores_every_photo_once(tmp_path, monkeypatch):
    """nebula crossval --unfreeze 1: the fine-tuned recipe is scored like the head-only one and says so in its record."""
    import json

    from click.testing import CliRunner
    from conftest import write_sky_folder

    from nebula.cli import cli
    from nebula.train import crossval
    from nebula.train.manifest import load_dataset, write_manifest

    monkeypatch.setattr(crossval, "FEATURE_CACHE", tmp_path / "cache")
    data = write_sky_folder(tmp_path / "sky", per_label=8, size=48)
    rows = load_dataset(data)
    groups = sorted({row.group for row in rows})
    for row in rows:
        row.credit = f"Photographer {groups.index(row.group) % 6}"
    write_manifest(rows, data / "manifest.csv")
    result = CliRunner().invoke(cli, ["crossval", "--data", str(data), "--out", str(tmp_path / "cv"), "--backbone", "tiny",
                                      "--folds", "3", "--views", "2", "--unfreeze", "1", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "cv" / "crossval.json").read_text())
    assert record["config"]["unfreeze"] == 1 and record["config"]["epochs"] == 2
    assert "top 1 backbone unit fine-tuned per fold" in result.output
    assert record["photographs"] == len(rows) and sum(f["test_images"] for f in record["folds"]) == len(rows)
    too_deep = CliRunner().invoke(cli, ["crossval", "--data", str(data), "--out", str(tmp_path / "cv2"), "--backbone", "tiny",
                                        "--folds", "3", "--unfreeze", "9"])
    assert too_deep.exit_code == 1 and "--unfreeze 9" in too_deep.output and "4 units" in too_deep.output
