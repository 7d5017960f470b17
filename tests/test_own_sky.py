"""`nebula own-sky`: the review loop measured on a photographer held out of the dataset."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_sky_folder
from nebula.cli import cli
from nebula.train.manifest import MANIFEST_NAME, ManifestRow, load_dataset, manifest_from_folder, write_manifest
from nebula.train.own_sky import OwnSkyError, capture_name, draw_frames, plan


def _row(file, label, credit, group, origin="photo", designation=""):
    return ManifestRow(file=file, label=label, label_reason="test", designation=designation, group=group, credit=credit,
                       origin=origin)


def test_the_base_set_holds_nothing_of_the_photographer_nor_of_their_objects():
    rows = [
        _row("emission/m42.png", "emission", "ann", "m42"),
        _row("emission/m42-bob.png", "emission", "bob", "m42"),  # another photographer, the same object
        _row("emission/crops/m42__ngc1977.png", "emission", "ann", "m42", origin="crop"),
        _row("dark/b33.png", "dark", "bob", "b33"),
        _row("dark/crops/b33__ldn1630.png", "dark", "bob", "b33", origin="crop"),
        _row("other/m31.png", "other", "ann <http://ann.example/>", "m31"),  # a credit with the photographer's address
    ]
    base, theirs = plan(rows, "ann")
    assert [r.file for r in theirs] == ["emission/m42.png", "other/m31.png"]  # photographs only, never crops
    assert [r.file for r in base] == ["dark/b33.png", "dark/crops/b33__ldn1630.png"]


def test_an_unknown_photographer_is_one_line_naming_the_credits_there_are():
    rows = [_row("dark/b33.png", "dark", "bob", "b33"), _row("dark/b34.png", "dark", "bob", "b34")]
    with pytest.raises(OwnSkyError, match=r"no photographs credited to 'zed'; the most frequent credits: bob \(2\)"):
        plan(rows, "zed")


def test_larger_n_labels_a_superset_and_the_held_out_photographs_are_never_labelled():
    theirs = [_row(f"other/p{i:02d}.png", "other", "ann", f"p{i}") for i in range(20)]
    frames, held_out = draw_frames(theirs, 12, seed=3)
    assert len(frames) == 12 and len(held_out) == 8
    assert not {r.file for r in frames} & {r.file for r in held_out}
    assert draw_frames(theirs, 12, seed=3) == (frames, held_out)  # the draw is the seed's
    assert draw_frames(theirs, 12, seed=4)[0] != frames
    with pytest.raises(OwnSkyError, match="labelling 16 leaves 4 to score on"):
        draw_frames(theirs, 16, seed=0)


def test_a_capture_is_named_as_a_capture_program_names_its_target():
    assert capture_name(_row("planetary/n2371-vasey.png", "planetary", "p", "g", designation="NGC 2371"), 3) == "NGC_2371_Light_003.png"
    assert capture_name(_row("other/odd.png", "other", "p", "g"), 0) == "odd_Light_000.png"


TINY = {"backbone": "tiny", "unfreeze": 0, "views": 2, "head": "dense", "head_epochs": 8, "head_lr": 0.05, "calibrate": False, "dropout": 0.0,
        "patience": 8}


@pytest.fixture(scope="module")
def credited_sky(tmp_path_factory):
    """Generated skies of three photographers; 'ann' has 12 photographs, each its own object."""
    root = write_sky_folder(tmp_path_factory.mktemp("credited"), per_label=14)
    rows = []
    for i, row in enumerate(manifest_from_folder(root)):
        ann = i % 3 == 0
        rows.append(ManifestRow(file=row.file, label=row.label, label_reason=row.label_reason,
                                designation=f"NGC {7000 + i}" if ann else row.designation,
                                group=f"ngc{7000 + i}" if ann else row.group, credit="ann" if ann else ("bob" if i % 3 == 1 else "cyd")))
    write_manifest(rows, root / MANIFEST_NAME)
    return root


@pytest.mark.slow
def test_the_curve_runs_the_whole_loop_and_scores_every_run_on_one_held_out_set(credited_sky, tmp_path):
    from nebula.train.own_sky import own_sky_curve

    out = tmp_path / "own"
    points = own_sky_curve(credited_sky, "ann", [4], out, recipe=TINY, echo=lambda line: None)
    assert [(p.draw, p.n) for p in points] == [(0, 0), (0, 4)]
    record = json.loads((out / "own_sky.json").read_text())
    labelled = record["draws"]["0"]["labelled_order"][:4]
    assert len(record["photographs"]) == 14
    base, tuned = record["points"]
    assert sorted(base["predicted"]) == sorted(record["photographs"])  # N = 0: every photograph of theirs
    assert sorted(tuned["predicted"]) == sorted(set(record["photographs"]) - set(labelled))  # never one it labelled
    assert tuned["held_out"] == 10 and base["base_accuracy"] == base["accuracy"]
    truth = record["photographs"]
    assert tuned["base_accuracy"] == pytest.approx(  # the base run on the tuned run's held-out photographs, paired
        sum(base["predicted"][f] == truth[f] for f in tuned["predicted"]) / 10)
    assert (out / "own_sky.png").stat().st_size > 0

    dataset = load_dataset(out / "data" / "base")
    assert dataset and not any(r.credit == "ann" for r in dataset)
    merged = [r for r in load_dataset(out / "data" / "draw0-n4") if r.credit == "ann"]
    assert len(merged) == 4 and all(r.label_reason.startswith("labelled by ann on the review page") for r in merged)
    assert sorted(r.label for r in merged) == sorted(Path(f).parts[0] for f in labelled)  # filed under their true label
    assert len({r.group for r in merged}) == 4  # one target per frame, from the capture's name
    assert sum(points[1].labelled_in_split.values()) == 4
    assert json.loads((Path(points[1].run) / "config.json").read_text())["init_from"] == str(out / "runs" / "n0")

    said = []
    again = own_sky_curve(credited_sky, "ann", [4], out, recipe=TINY, resume=True, echo=said.append)
    assert sum("reusing" in line for line in said) == 4  # two runs, two models
    assert [p.predicted for p in again] == [p.predicted for p in points]


def test_the_command_refuses_an_n_that_leaves_too_few_to_score(credited_sky, tmp_path):
    result = CliRunner().invoke(cli, ["own-sky", "--data", str(credited_sky), "--photographer", "ann", "--n", "12",
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: the photographer has 14 photographs: labelling 12 leaves 2 to score on "
                                     "(at least 5); use a smaller --n")
