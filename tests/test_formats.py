"""The one table of input formats, and every reader of it agreeing with it."""

import gzip
import io

import numpy as np
import pytest
from astropy.io import fits as astrofits
from PIL import Image

from conftest import sky_image
from nebula.device import decode, formats
from nebula.device.camera import WatchFolder
from nebula.device.classify import find_images
from nebula.device.preprocess import PreprocessSpec


def _encoded(kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(sky_image("emission", size=32)).save(buffer, format=kind)
    return buffer.getvalue()


def _fits_bytes() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    astrofits.PrimaryHDU(rng.normal(1000, 30, (32, 32)).astype(np.uint16)).writeto(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["JPEG", "PNG", "TIFF"])
def test_content_sniffing_knows_what_pil_writes(kind):
    assert formats.by_content(_encoded(kind)[: formats.HEAD_BYTES]).name == kind


def test_content_sniffing_knows_fits_and_refuses_others():
    assert formats.by_content(_fits_bytes()[: formats.HEAD_BYTES]).name == "FITS"
    assert formats.by_content(b"MM\x00*\x00\x00").name == "TIFF"  # big-endian TIFF
    assert formats.by_content(b"GIF89a") is None and formats.by_content(b"<html>") is None
    assert formats.by_content(gzip.compress(_fits_bytes())[: formats.HEAD_BYTES]) is None  # gzip: by name only


@pytest.mark.parametrize("name,suffix,kind", [
    ("M42.jpg", ".jpg", "JPEG"), ("M42.JPEG", ".jpeg", "JPEG"), ("a.b.png", ".png", "PNG"), ("x.TIF", ".tif", "TIFF"),
    ("light_001.fits", ".fits", "FITS"), ("light_001.FIT.GZ", ".fit.gz", "FITS"), ("stack.fits.gz", ".fits.gz", "FITS"),
    ("packed.fz", ".fz", "FITS"), ("notes.txt", None, None), ("archive.gz", None, None),
])
def test_names_map_to_formats_by_their_longest_suffix(name, suffix, kind):
    assert formats.image_suffix(name) == suffix
    assert (formats.by_name(name).name if formats.by_name(name) else None) == kind


def test_stem_drops_the_whole_image_suffix():
    assert formats.stem("M42.fits.gz") == "M42" and formats.stem("M 42-2.JPG") == "M 42-2" and formats.stem("notes.txt") == "notes"


def test_hidden_files_are_not_image_names():
    assert formats.is_image_name("M42.png") and not formats.is_image_name("._M42.png") and not formats.is_image_name(".DS_Store")


def test_help_texts_name_every_format():
    text = formats.names_text()
    assert all(fmt.name in text for fmt in formats.FORMATS) and text.endswith(" or " + formats.FORMATS[-1].name)


def test_every_decoder_the_table_names_exists():
    assert {fmt.decoder for fmt in formats.FORMATS} <= set(decode._DECODERS)


def test_content_wins_over_a_wrong_name(tmp_path):
    (tmp_path / "mislabelled.fits").write_bytes(_encoded("PNG"))
    (tmp_path / "mislabelled.png").write_bytes(_fits_bytes())
    assert decode.load_image(tmp_path / "mislabelled.fits").shape == (32, 32, 3)  # PNG content
    assert decode.load_image(tmp_path / "mislabelled.png").shape == (32, 32, 3)  # FITS content, stretched


def test_gzipped_fits_decodes_by_its_name(tmp_path):
    path = tmp_path / "light.fits.gz"
    path.write_bytes(gzip.compress(_fits_bytes()))
    image = decode.load_image(path, PreprocessSpec(input_size=32))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image.std() > 0


def test_the_folder_walk_and_the_watcher_take_the_same_names(tmp_path):
    names = ["a.jpg", "b.fits.gz", "c.fz", "d.TIFF", "e.txt", "f.gz", "._g.png"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    wanted = {"a.jpg", "b.fits.gz", "c.fz", "d.TIFF"}
    assert {p.name for p in find_images([tmp_path])} == wanted
    assert {p.name for p in WatchFolder(tmp_path).scan()} == wanted
