"""Header coordinates: every spelling capture programs use, the field-of-view arithmetic, and broken headers."""

import gzip
import math

import numpy as np
import pytest

from nebula.device.fits_header import parse_header_cards, read_fits_header
from nebula.device.position import (field_from_optics, parse_dec, parse_ra, parse_ra_hours, position_of_file,
                                    read_header_position, separation_deg)

M42_RA, M42_DEC = 83.82208, -5.39111  # 05h35m17.3s, -05d23m28s


@pytest.mark.parametrize("text,degrees", [
    ("05 35 17.3", 83.82208), ("05:35:17.3", 83.82208), ("5h35m17.3s", 83.82208), ("83.82208", 83.82208),
    ("83d49m19.5s", 83.82208), ("23 59 59.99", 359.99996), ("00 00 00", 0.0),
])
def test_ra_strings(text, degrees):
    assert parse_ra(text) == pytest.approx(degrees, abs=1e-4)


def test_ra_number_is_degrees_but_objctra_number_is_hours():
    assert parse_ra(83.5) == 83.5
    assert parse_ra_hours("5.5") == pytest.approx(82.5)


@pytest.mark.parametrize("text,degrees", [
    ("-05 23 28", -5.39111), ("-05:23:28", -5.39111), ("-05d23m28s", -5.39111), ("+41 16 09", 41.26917),
    ("-00 30 00", -0.5), ("-0:30:00", -0.5), ("+00 30 00", 0.5), ("-0.5", -0.5), ("-89 59 59", -89.99972),
])
def test_dec_strings_keep_their_sign(text, degrees):
    assert parse_dec(text) == pytest.approx(degrees, abs=1e-4)


@pytest.mark.parametrize("bad", ["north", "95 00 00", "12 75 00", "", "24 00 01"])
def test_bad_coordinates_raise_value_error(bad):
    with pytest.raises(ValueError):
        parse_ra(bad) if bad.startswith("24") else parse_dec(bad)


def _wcs(**extra):
    header = {"NAXIS1": 1000, "NAXIS2": 800, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN",
              "CRVAL1": M42_RA, "CRVAL2": M42_DEC, "CRPIX1": 500.5, "CRPIX2": 400.5,
              "CD1_1": -1 / 3600, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 1 / 3600}
    header.update(extra)
    return {k: v for k, v in header.items() if v is not None}


def test_wcs_cd_gives_centre_and_field():
    found = read_header_position(_wcs())
    p = found.position
    assert (p.ra, p.dec) == pytest.approx((M42_RA, M42_DEC))
    assert (p.width_deg, p.height_deg) == pytest.approx((1000 / 3600, 800 / 3600))
    assert p.keywords == "WCS" and p.source == "header" and found.warnings == []


def _project_tan(ra0, dec0, ra, dec):
    """Forward gnomonic projection (the FITS TAN standard), degrees in and out."""
    ra0, dec0, ra, dec = map(math.radians, (ra0, dec0, ra, dec))
    cos_c = math.sin(dec0) * math.sin(dec) + math.cos(dec0) * math.cos(dec) * math.cos(ra - ra0)
    x = math.cos(dec) * math.sin(ra - ra0) / cos_c
    y = (math.cos(dec0) * math.sin(dec) - math.sin(dec0) * math.cos(dec) * math.cos(ra - ra0)) / cos_c
    return math.degrees(x), math.degrees(y)


def test_wcs_centre_is_the_middle_pixel_not_crval():
    # The reference pixel at the corner: the middle pixel is 500 columns and 400 rows away.
    p = read_header_position(_wcs(CRPIX1=0.5, CRPIX2=0.5, CRVAL2=60.0)).position
    assert _project_tan(M42_RA, 60.0, p.ra, p.dec) == pytest.approx((-500 / 3600, 400 / 3600), abs=1e-9)
    assert separation_deg(p.ra, p.dec, M42_RA, 60.0) == pytest.approx(math.hypot(500, 400) / 3600, rel=1e-4)


def test_wcs_cdelt_with_crota2_and_with_pc():
    rotated = read_header_position(_wcs(CD1_1=None, CD1_2=None, CD2_1=None, CD2_2=None,
                                        CDELT1=-2 / 3600, CDELT2=2 / 3600, CROTA2=30.0)).position
    assert (rotated.width_deg, rotated.height_deg) == pytest.approx((2000 / 3600, 1600 / 3600))
    pc = read_header_position(_wcs(CD1_1=None, CD1_2=None, CD2_1=None, CD2_2=None, CDELT1=-1.5 / 3600,
                                   CDELT2=1.5 / 3600, PC1_1=0.0, PC1_2=1.0, PC2_1=-1.0, PC2_2=0.0)).position
    assert (pc.width_deg, pc.height_deg) == pytest.approx((1500 / 3600, 1200 / 3600))


def test_wcs_wins_over_pointing_keywords_and_a_contradiction_is_one_warning():
    found = read_header_position(_wcs(RA=10.0, DEC=10.0))
    assert found.position.keywords == "WCS"
    assert len(found.warnings) == 1 and "from the WCS centre" in found.warnings[0] and "\n" not in found.warnings[0]
    close = read_header_position(_wcs(RA=M42_RA + 0.05, DEC=M42_DEC))
    assert close.warnings == []


def test_galactic_wcs_is_ignored_with_a_warning_and_pointing_used():
    found = read_header_position(_wcs(CTYPE1="GLON-TAN", CTYPE2="GLAT-TAN", RA=M42_RA, DEC=M42_DEC))
    assert found.position.keywords == "RA/DEC"
    assert any("CTYPE" in w for w in found.warnings)


def test_ra_dec_degrees_as_ekos_and_nina_write_them():
    found = read_header_position({"RA": M42_RA, "DEC": M42_DEC, "OBJECT": "M 42"})
    assert (found.position.ra, found.position.dec) == pytest.approx((M42_RA, M42_DEC))
    assert found.position.field_deg is None and found.target == "M 42"


def test_ra_dec_as_sexagesimal_strings():
    found = read_header_position({"RA": "05:35:17.3", "DEC": "-05:23:28"})
    assert (found.position.ra, found.position.dec) == pytest.approx((M42_RA, M42_DEC), abs=1e-4)


def test_objctra_objctdec_and_negative_zero_dec():
    found = read_header_position({"OBJCTRA": "12 00 00", "OBJCTDEC": "-00 30 00"})
    assert (found.position.ra, found.position.dec) == pytest.approx((180.0, -0.5))
    assert found.position.keywords == "OBJCTRA/OBJCTDEC"


def test_disagreeing_pointing_pairs_warn_and_ra_dec_wins():
    found = read_header_position({"RA": M42_RA, "DEC": M42_DEC, "OBJCTRA": "20 00 00", "OBJCTDEC": "+40 00 00"})
    assert found.position.keywords == "RA/DEC"
    assert any("apart" in w for w in found.warnings)


@pytest.mark.parametrize("header,warned", [
    ({"RA": "abc", "DEC": 3.0}, "RA/DEC ignored"),
    ({"RA": 400.0, "DEC": 3.0}, "outside 0..360"),
    ({"RA": 10.0}, "only RA is present"),
    ({"OBJCTRA": "05 35", "OBJCTDEC": "north"}, "OBJCTRA/OBJCTDEC ignored"),
    ({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": "x", "CRVAL2": 1.0}, "WCS ignored"),
])
def test_broken_pieces_give_one_line_warnings_and_no_position(header, warned):
    found = read_header_position(header)
    assert found.position is None
    assert len(found.warnings) == 1 and warned in found.warnings[0]


def test_missing_everything_is_nothing():
    found = read_header_position({"NAXIS1": 100, "NAXIS2": 100, "EXPTIME": 30.0})
    assert found.position is None and found.field_deg is None and found.warnings == []


def test_field_from_optics_arithmetic():
    # 400 mm, 3.76 um pixels: 1.939"/px; 6248 x 4176 px (an IMX571): 3.365 x 2.249 deg.
    width, height = field_from_optics(400, 3.76, 6248, 4176)
    assert width == pytest.approx(206264.806 * 3.76e-3 / 400 * 6248 / 3600)
    assert (width, height) == pytest.approx((3.365, 2.249), abs=1e-3)


def test_field_from_focal_length_xpixsz_is_already_binned():
    found = read_header_position({"RA": 10.0, "DEC": 20.0, "FOCALLEN": 400.0, "XPIXSZ": 7.52, "XBINNING": 2,
                                  "NAXIS1": 3124, "NAXIS2": 2088})
    assert found.position.width_deg == pytest.approx(field_from_optics(400, 7.52, 3124, 2088)[0])


def test_field_from_pixsize1_is_multiplied_by_binning():
    found = read_header_position({"FOCALLEN": 400.0, "PIXSIZE1": 3.76, "XBINNING": 2, "YBINNING": 2,
                                  "NAXIS1": 3124, "NAXIS2": 2088})
    assert found.position is None  # no pointing, but the field is known: a plate solver's scale hint
    assert found.field_deg == pytest.approx(field_from_optics(400, 7.52, 3124, 2088))


def test_field_from_pixscale_and_image_size_argument():
    found = read_header_position({"PIXSCALE": 2.0}, image_size=(1800, 900))
    assert found.field_deg == pytest.approx((1.0, 0.5))


def test_non_numeric_focal_length_is_a_warning():
    found = read_header_position({"RA": 1.0, "DEC": 1.0, "FOCALLEN": "long", "XPIXSZ": 3.76, "NAXIS1": 10, "NAXIS2": 10})
    assert found.position is not None and found.position.field_deg is None
    assert any("FOCALLEN" in w for w in found.warnings)


def test_separation():
    assert separation_deg(0, 0, 90, 0) == pytest.approx(90)
    assert separation_deg(359.9, 0, 0.1, 0) == pytest.approx(0.2)
    assert separation_deg(10, 89.9, 190, 89.9) == pytest.approx(0.2)


def test_card_parser():
    cards = "".join(c.ljust(80) for c in ["SIMPLE  =                    T", "OBJECT  = 'O''Brien' / who",
                                         "FOCALLEN=                400.5 / mm", "NAXIS   =                    2",
                                         "CD1_1   =     -2.7777777778D-04", "END"]).encode()
    header = parse_header_cards(cards)
    assert header == {"SIMPLE": True, "OBJECT": "O'Brien", "FOCALLEN": 400.5, "NAXIS": 2, "CD1_1": pytest.approx(-1 / 3600)}


@pytest.fixture
def fits_header():
    from astropy.io import fits

    header = fits.Header()
    header["OBJCTRA"], header["OBJCTDEC"], header["OBJECT"] = "05 35 17.3", "-05 23 28", "M 42"
    header["FOCALLEN"], header["XPIXSZ"] = 400.0, 3.76
    return header


def test_read_real_fits_files_plain_gzip_and_tile_compressed(tmp_path, fits_header):
    from astropy.io import fits

    data = np.random.default_rng(0).normal(1000, 30, (60, 80)).astype(np.uint16)
    fits.PrimaryHDU(data, fits_header).writeto(tmp_path / "plain.fits")
    (tmp_path / "plain.fits.gz").write_bytes(gzip.compress((tmp_path / "plain.fits").read_bytes()))
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, fits_header)]).writeto(tmp_path / "tiles.fz")
    for name in ("plain.fits", "plain.fits.gz", "tiles.fz"):
        header, size = read_fits_header(tmp_path / name)
        assert size == (80, 60), name
        found = position_of_file(tmp_path / name)
        assert (found.position.ra, found.position.dec) == pytest.approx((M42_RA, M42_DEC), abs=1e-4), name
        assert found.position.width_deg == pytest.approx(field_from_optics(400, 3.76, 80, 60)[0]), name


def test_unreadable_and_non_fits_files(tmp_path):
    (tmp_path / "broken.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    found = position_of_file(tmp_path / "broken.fits")
    assert found.position is None and len(found.warnings) == 1 and "header not readable" in found.warnings[0]
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert position_of_file(tmp_path / "photo.png").warnings == []
    assert "cannot read" in position_of_file(tmp_path / "missing.fits").warnings[0]
