"""Offline plate solving: each way it can fail says why in one line; a real Stellarium photograph solves."""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nebula.device import platesolve
from nebula.device.position import SkyPosition, separation_deg

STELLARIUM = Path("/usr/share/stellarium/nebulae/default")
needs_solver = pytest.mark.skipif(platesolve.unavailable_reason() is not None,
                                  reason=str(platesolve.unavailable_reason()))


def _star_field(path: Path, stars: int, size: int = 400, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sky = rng.normal(10, 2, (size, size))
    yy, xx = np.mgrid[-6:7, -6:7]
    for y, x in rng.integers(20, size - 20, (stars, 2)):
        sky[y - 6:y + 7, x - 6:x + 7] += 200 * np.exp(-(yy ** 2 + xx ** 2) / 4.0)
    Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8)).save(path)
    return path


def test_missing_solver_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    result = platesolve.solve(_star_field(tmp_path / "a.png", 30))
    assert not result.solved
    assert "solve-field is not installed" in result.reason and "apt install astrometry.net" in result.reason


def test_missing_indexes_say_what_to_install(tmp_path):
    if shutil.which(platesolve.SOLVER) is None:
        pytest.skip("solve-field is not installed here")
    result = platesolve.solve(_star_field(tmp_path / "a.png", 30), index_dirs=(tmp_path,))
    assert "no astrometry.net index files" in result.reason and "astrometry-data-tycho2" in result.reason


@needs_solver
def test_a_field_narrower_than_the_indexes_is_refused_at_once(tmp_path):
    result = platesolve.solve(_star_field(tmp_path / "a.png", 30), field_hint_deg=(10 / 60, 7 / 60))
    assert "narrower than the smallest Tycho-2 index (22')" in result.reason


@needs_solver
def test_missing_file(tmp_path):
    assert platesolve.solve(tmp_path / "none.png").reason == "not solved: no such file"


@needs_solver
def test_too_few_stars(tmp_path):
    result = platesolve.solve(_star_field(tmp_path / "empty.png", 4), cpulimit_s=5)
    assert not result.solved and result.reason.startswith("not solved: too few stars")
    assert result.stars is not None and result.stars < platesolve.MIN_STARS


def _running_in_group(group: int) -> list[int]:
    """Processes of this group that still run (zombies hold no files)."""
    running = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(pgrp) == group and state != "Z":
            running.append(int(stat.parent.name))
    return running


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_killed_solver_takes_its_helpers_with_it(tmp_path):
    """solve-field's helpers (image2pnm, astrometry-engine) are in its process group: a timeout kills them all,
    so none is still writing into the work folder that is removed next."""
    import subprocess

    solver = subprocess.Popen(["bash", "-c", "while :; do touch f; done & sleep 60 & wait"], cwd=tmp_path,
                              start_new_session=True)
    while not (tmp_path / "f").exists():  # the writing helper runs
        pass
    assert len(_running_in_group(solver.pid)) >= 3  # the shell, its writing loop (and a touch, maybe), the sleep
    platesolve._kill_group(solver)
    assert _running_in_group(solver.pid) == []


@needs_solver
def test_timeout_kills_the_solver_and_removes_its_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = platesolve.solve(_star_field(tmp_path / "stars.png", 300, size=1200), cpulimit_s=30, timeout_s=0.5)
    assert result.reason == "not solved: timeout after 0.5 s"
    assert not list(tmp_path.glob("nebula-solve-*"))


@needs_solver
@pytest.mark.slow
@pytest.mark.skipif(not (STELLARIUM / "m42.png").exists(), reason="stellarium-data is not installed")
def test_real_stellarium_photograph_solves_near_its_footprint(tmp_path, monkeypatch):
    from nebula.train.catalog_evaluate import footprint_position
    from nebula.train.stellarium import read_textures

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    texture = next(t for t in read_textures(STELLARIUM / "textures.json") if t.image == "m42.png")
    truth = footprint_position(texture)
    result = platesolve.solve(STELLARIUM / texture.image, cpulimit_s=60)
    assert result.solved, result.reason
    p = result.position
    assert p.source == "solve" and isinstance(p, SkyPosition)
    assert separation_deg(p.ra, p.dec, truth.ra, truth.dec) < 0.05 * truth.field_deg
    assert p.field_deg == pytest.approx(truth.field_deg, rel=0.05)
    assert not list(tmp_path.glob("nebula-solve-*"))
