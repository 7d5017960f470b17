"""Offline plate solving with astrometry.net's `solve-field`: where a frame without coordinates points.

Debian packages both halves: ``astrometry.net`` (the solver) and the Tycho-2
index files (``astrometry-data-tycho2``: about 290 MB installed, all scales).
**Those indexes cover fields from about 22 arcminutes up** (index 07, 22'-30',
to index 19, the whole sky): a frame narrower than that cannot be solved with
them; the smaller index series (4100/5200, built from 2MASS or Gaia) are not
packaged by Debian. Without the solver or the indexes, `solve` says so in one
line and nothing else changes.

Each solve runs `solve-field` as a subprocess in a private temporary folder
(removed afterwards), CPU-bounded (``--cpulimit``) and under a wall-clock
limit (3 x the CPU limit + 30 s by default; its process group is killed past it), with no plots and no output but
the WCS. Scale hints (from the header's optics) and a position hint narrow
the search when known. The answer is a `SkyPosition` with source "solve", or
a one-line reason: not installed, no index for this scale, too few stars,
no match, timeout.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nebula.device.fits_header import fits_headers, parse_header_cards, read_fits_header
from nebula.device.position import SkyPosition, read_header_position

SOLVER = "solve-field"
INDEX_DIRS = (Path("/usr/share/astrometry"), Path("/usr/local/astrometry/data"))
SMALLEST_INDEX_ARCMIN = 22.0  # Debian's Tycho-2 index 07 (22'-30'): narrower fields need indexes Debian lacks
APT_PACKAGES = "astrometry.net astrometry-data-tycho2"
DEFAULT_CPULIMIT_S = 30
MIN_STARS = 10  # fewer sources than this: astrometry.net cannot build enough quads to match
_TARGET_SIDE_PX = 1000  # downsample so the longer side is about this: stars stay, extraction is fast
# The wall-clock limit guards against a hung solver; the CPU limit is the budget. Source extraction runs
# before the CPU limit counts, and a busy machine stretches wall time, hence the slack.
_WALL_FACTOR, _WALL_MARGIN_S = 3, 30
_SCALE_SLACK = 1.5  # a header's field size is trusted to within this factor


@dataclass(frozen=True)
class SolveResult:
    position: SkyPosition | None = None
    reason: str | None = None  # why there is no position, one line
    stars: int | None = None  # sources the solver extracted

    @property
    def solved(self) -> bool:
        return self.position is not None


def index_files(dirs=INDEX_DIRS) -> list[Path]:
    return sorted(p for d in dirs if d.is_dir() for p in d.glob("index-*.fits"))


def unavailable_reason(dirs=INDEX_DIRS) -> str | None:
    """Why this machine cannot plate-solve, in one line, or None when it can."""
    if shutil.which(SOLVER) is None:
        return f"plate solving unavailable: {SOLVER} is not installed (apt install {APT_PACKAGES})"
    if not index_files(dirs):
        return (f"plate solving unavailable: no astrometry.net index files in {', '.join(map(str, dirs))} "
                "(apt install astrometry-data-tycho2)")
    return None


def solve(path: str | Path, field_hint_deg: tuple[float, float] | None = None, near: SkyPosition | None = None,
          cpulimit_s: int = DEFAULT_CPULIMIT_S, timeout_s: float | None = None, image_size: tuple[int, int] | None = None,
          index_dirs=INDEX_DIRS) -> SolveResult:
    """Plate-solve one image file (FITS, JPEG, PNG, TIFF); never raises for a file that does not solve."""
    path = Path(path)
    missing = unavailable_reason(index_dirs)
    if missing:
        return SolveResult(reason=missing)
    if field_hint_deg and max(field_hint_deg) * 60 * _SCALE_SLACK < SMALLEST_INDEX_ARCMIN:
        return SolveResult(reason=f"field {max(field_hint_deg) * 60:.1f}' is narrower than the smallest Tycho-2 index "
                                  f"({SMALLEST_INDEX_ARCMIN:.0f}'): Debian packages no index for this scale")
    if not path.is_file():
        return SolveResult(reason="not solved: no such file")
    size = image_size or _image_size(path)
    timeout_s = timeout_s or _WALL_FACTOR * cpulimit_s + _WALL_MARGIN_S
    with tempfile.TemporaryDirectory(prefix="nebula-solve-") as work:
        work = Path(work)
        command = _command(path, work, cpulimit_s, size, field_hint_deg, near)
        try:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True, cwd=work)
        except OSError as err:
            return SolveResult(reason=f"plate solving unavailable: cannot start {SOLVER} ({err.strerror or err})")
        try:
            output, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            return SolveResult(reason=f"not solved: timeout after {timeout_s:g} s", stars=_source_count(work))
        stars = _source_count(work)
        wcs = work / "solution.wcs"
        if wcs.is_file():
            header = parse_header_cards(wcs.read_bytes())
            found = read_header_position(header, size)
            if found.position is not None:
                p = found.position
                return SolveResult(SkyPosition(p.ra, p.dec, p.width_deg, p.height_deg, "solve", "solve-field"), stars=stars)
        narrow = field_hint_deg is None or min(field_hint_deg) * 60 < 2 * SMALLEST_INDEX_ARCMIN
        return SolveResult(reason=_failure_reason(process.returncode, output, stars, cpulimit_s, narrow), stars=stars)


def _command(path: Path, work: Path, cpulimit_s: int, size, field_hint_deg, near: SkyPosition | None) -> list[str]:
    command = [SOLVER, "--overwrite", "--no-plots", "--dir", str(work), "--temp-dir", str(work),
               "--cpulimit", str(int(cpulimit_s)), "--crpix-center", "--no-verify",
               "--new-fits", "none", "--corr", "none", "--rdls", "none", "--match", "none", "--solved", "none",
               "--index-xyls", "none", "--wcs", str(work / "solution.wcs"), "--axy", str(work / "sources.axy")]
    # Downsampling by 2 at least: at full resolution noise and nebulosity give hundreds of false sources.
    command += ["--downsample", str(max(2, max(size or (0,)) // _TARGET_SIDE_PX))]
    if field_hint_deg:
        widest = max(field_hint_deg) * 60
        command += ["--scale-units", "arcminwidth", "--scale-low", f"{widest / _SCALE_SLACK:.3f}",
                    "--scale-high", f"{widest * _SCALE_SLACK:.3f}"]
    if near is not None:
        radius = max(2.0, 2 * (near.field_deg or 1.0))
        command += ["--ra", f"{near.ra:.5f}", "--dec", f"{near.dec:.5f}", "--radius", f"{radius:.2f}"]
    return command + [str(path.resolve())]


def _image_size(path: Path) -> tuple[int, int] | None:
    from nebula.device import formats

    fmt = formats.by_name(path.name)
    try:
        if fmt is not None and fmt.name == "FITS":
            return read_fits_header(path)[1]
        from PIL import Image

        with Image.open(path) as image:  # reads the size, not the pixels
            return image.size
    except (OSError, ValueError):
        return None


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _source_count(work: Path) -> int | None:
    """Rows of the sources table astrometry.net extracted (the .axy file's first extension)."""
    axy = work / "sources.axy"
    try:
        with open(axy, "rb") as file:  # the table's header, not its rows: a solver killed mid-write still counts
            headers = list(itertools.islice(fits_headers(file), 2))
    except (OSError, ValueError, EOFError):
        return None
    rows = headers[1].get("NAXIS2") if len(headers) > 1 else None
    return rows if isinstance(rows, int) else None


def _failure_reason(returncode: int, output: str, stars: int | None, cpulimit_s: int, maybe_narrow: bool = True) -> str:
    if stars is not None and stars < MIN_STARS:
        return f"not solved: too few stars ({stars} found, at least {MIN_STARS} needed)"
    if returncode != 0:
        last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "no output")
        return f"not solved: {SOLVER} failed (exit {returncode}: {last[:160]})"
    if "cpu limit" in output.lower() or "time limit" in output.lower():
        return f"not solved: no match within the {cpulimit_s} s CPU limit ({stars} stars)"
    found = f"{stars if stars is not None else 'unknown number of'} stars"
    if maybe_narrow:  # a field of unknown size may be one the indexes do not cover
        found += f"; fields under {SMALLEST_INDEX_ARCMIN:.0f}' need indexes Debian does not package"
    return f"not solved: no match in the index files ({found})"
