"""Decoding every input a telescope user has, and one clear line for every bad one."""

import gzip
import io
import os
import struct
import zlib

import numpy as np
import pytest
from astropy.io import fits as astrofits
from PIL import Image

from nebula.device import decode, fits
from nebula.device.decode import ImageError, SkippedImage, load_image
from nebula.device.fits_header import first_image_header
from nebula.device.preprocess import PreprocessSpec

# ---------------------------------------------------------------- helpers


def linear_frame(height=120, width=160, colour=(1.0, 0.15, 0.2), seed=0, hot_pixels=0) -> np.ndarray:
    """(3, H, W) uint16 like a camera writes: offset 1000, noise, a faint coloured glow, a few stars."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    glow = np.exp(-((yy - height / 2) ** 2 + (xx - width / 2) ** 2) / (2 * (height / 5) ** 2))
    frame = 1000 + 400 * glow[None] * np.array(colour)[:, None, None] + rng.normal(0, 15, (3, height, width))
    for y, x in zip(rng.integers(0, height, 8), rng.integers(0, width, 8)):
        frame[:, y, x] += 20000
    if hot_pixels:
        frame[:, rng.integers(0, height, hot_pixels), rng.integers(0, width, hot_pixels)] = 65535
    return np.clip(frame, 0, 65535).astype(np.uint16)


def write_fits(path, data, **header):
    hdu = astrofits.PrimaryHDU(data)
    for key, value in header.items():
        hdu.header[key] = value
    hdu.writeto(path, overwrite=True)
    return path


def write_tiff16(path, array):
    """An uncompressed little-endian TIFF of an HxW or HxWx3 uint16 array (PIL cannot write 16-bit RGB)."""
    array = np.ascontiguousarray(array, dtype="<u2")
    height, width = array.shape[:2]
    samples = 1 if array.ndim == 2 else 3
    pixels = array.tobytes()
    n_entries = 10
    extra_at = 8 + 2 + n_entries * 12 + 4
    extra = struct.pack("<3H", 16, 16, 16) if samples == 3 else b""

    def short(tag, value):
        return struct.pack("<HHIHH", tag, 3, 1, value, 0)

    def long(tag, value):
        return struct.pack("<HHII", tag, 4, 1, value)

    entries = [
        long(256, width), long(257, height),
        struct.pack("<HHII", 258, 3, 3, extra_at) if samples == 3 else short(258, 16),
        short(259, 1), short(262, 2 if samples == 3 else 1), long(273, extra_at + len(extra)),
        short(277, samples), long(278, height), long(279, len(pixels)), short(284, 1),
    ]
    ifd = struct.pack("<H", n_entries) + b"".join(entries) + struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + extra + pixels)
    return path


def png_header_only(path, width, height):
    """A PNG whose header claims width x height pixels: the shape of a decompression bomb."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def centre(rgb, fraction=8):
    h, w = rgb.shape[:2]
    return rgb[h // 2 - h // fraction : h // 2 + h // fraction, w // 2 - w // fraction : w // 2 + w // fraction].reshape(-1, 3).mean(0)


def corner(rgb, fraction=8):
    h, w = rgb.shape[:2]
    return np.median(rgb[: h // fraction, : w // fraction].reshape(-1, 3), axis=0)


# ---------------------------------------------------------------- JPEG, PNG, TIFF


def test_jpeg_is_turned_upright_by_exif(tmp_path):
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)  # red on the left, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    Image.fromarray(array).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    rgb = load_image(tmp_path / "rotated.jpg")
    assert rgb.shape == (40, 20, 3)
    assert rgb[:20, :, 0].mean() > 200 and rgb[20:, :, 0].mean() < 50  # the left became the top


def test_large_jpeg_is_decoded_reduced_but_not_below_the_models_need(tmp_path):
    Image.fromarray(np.full((1200, 1600, 3), 90, np.uint8)).save(tmp_path / "big.jpg")
    spec = PreprocessSpec(input_size=64)
    rgb = load_image(tmp_path / "big.jpg", spec)
    assert rgb.shape == (150, 200, 3)  # 1/8 scale, the DCT's smallest, still >= 64x48
    assert load_image(tmp_path / "big.jpg").shape == (1200, 1600, 3)


def test_png_palette_alpha_and_grey(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :4, 3] = 255  # left opaque, right fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    rgb = load_image(tmp_path / "alpha.png")
    assert tuple(rgb[0, 0]) == (200, 100, 50) and tuple(rgb[0, 7]) == (0, 0, 0)  # flattened onto black

    palette = Image.fromarray(rgba, "RGBA").convert("RGB").quantize(4)
    palette.save(tmp_path / "palette.png")
    assert load_image(tmp_path / "palette.png").shape == (8, 8, 3)

    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(tmp_path / "grey.png")
    assert (load_image(tmp_path / "grey.png") == 77).all()


def test_finished_16bit_png_is_scaled_not_stretched(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "finished16.png")
    rgb = load_image(tmp_path / "finished16.png")
    assert rgb.shape == (64, 64, 3)
    expected = np.round(values / 257.0)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1


def test_linear_16bit_tiff_is_stretched_and_keeps_its_colour(tmp_path):
    frame = np.moveaxis(linear_frame(), 0, 2)
    rgb = load_image(write_tiff16(tmp_path / "linear16.tif", frame))
    # Straight 16 -> 8 bit scaling would leave it black (1000/257 = 4); stretched, the sky is dark grey
    background = corner(rgb)
    assert 20 < background.mean() < 70
    red, green, blue = centre(rgb)
    assert red > background[0] + 60 and red > green + 40 and red > blue + 40


def test_linear_16bit_grey_tiff_is_stretched(tmp_path):
    rgb = load_image(write_tiff16(tmp_path / "mono16.tif", linear_frame()[0]))
    assert 20 < corner(rgb).mean() < 70 and centre(rgb).mean() > corner(rgb).mean() + 60
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_8bit_tiff(tmp_path):
    array = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "rgb8.tif")
    assert (load_image(tmp_path / "rgb8.tif") == array).all()


# ---------------------------------------------------------------- bad input, one line each


def _jpeg_bytes():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _png_bytes():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name,content,cause",
    [
        ("empty.jpg", b"", "empty file"),
        ("truncated.jpg", _jpeg_bytes()[:600], "truncated"),
        ("truncated.png", _png_bytes()[:400], "truncated"),
        ("notes.jpg", b"these are my observing notes, not a picture\n" * 5, "not an image"),
        ("garbage.fits", b"SIMPLE  =                    T" + b"\0" * 200, "FITS"),
    ],
)
def test_bad_files_are_one_clear_line(tmp_path, name, content, cause):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / name)
    message = str(err.value)
    assert message.startswith(str(tmp_path / name) + ": ") and "\n" not in message
    assert cause in message


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "absent.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


def test_decompression_bomb_is_refused(tmp_path):
    path = png_header_only(tmp_path / "bomb.png", 30000, 30000)  # 900 MP claimed, a few bytes stored
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(path)


def test_pils_bomb_warning_counts_as_the_error(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10000 pixels: over the warning, under PIL's error
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(tmp_path / "big.png")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    path.chmod(0)
    with pytest.raises(ImageError, match="permission denied"):
        load_image(path)


def test_permission_error_becomes_one_line(tmp_path, monkeypatch):
    def refuse(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(decode, "open", refuse, raising=False)  # as root, chmod 0 does not stop a read
    with pytest.raises(ImageError, match=r"locked\.png: permission denied"):
        load_image(tmp_path / "locked.png")


def test_truncated_images_stay_errors_even_if_someone_sets_pil_to_allow_them(tmp_path, monkeypatch):
    from PIL import ImageFile

    (tmp_path / "cut.jpg").write_bytes(_jpeg_bytes()[:600])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(tmp_path / "cut.jpg")


# ---------------------------------------------------------------- FITS


def test_mono_fits_is_stretched_to_a_dark_grey_sky(tmp_path):
    rgb = load_image(write_fits(tmp_path / "mono.fits", linear_frame()[0]))
    assert rgb.shape == (120, 160, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all()
    background = corner(rgb).mean()
    assert abs(background - 255 * fits.TARGET_BACKGROUND) < 15
    assert centre(rgb).mean() > background + 60


def test_rgb_cube_either_axis_order_gives_the_same_picture(tmp_path):
    cube = linear_frame()
    planes_first = load_image(write_fits(tmp_path / "first.fits", cube))
    planes_last = load_image(write_fits(tmp_path / "last.fits", np.moveaxis(cube, 0, 2)))
    assert (planes_first == planes_last).all()
    red, green, blue = centre(planes_first)
    assert red > green + 40 and red > blue + 40


def test_hot_pixels_do_not_change_the_stretch(tmp_path):
    clean = load_image(write_fits(tmp_path / "clean.fits", linear_frame(seed=3)))
    hot = load_image(write_fits(tmp_path / "hot.fits", linear_frame(seed=3, hot_pixels=40)))
    assert np.abs(corner(clean) - corner(hot)).max() <= 3
    assert np.abs(centre(clean) - centre(hot)).max() <= 8


def test_nans_are_ignored_and_drawn_black(tmp_path):
    data = linear_frame()[0].astype(np.float32)
    reference = load_image(write_fits(tmp_path / "plain.fits", data))
    data[:, :10] = np.nan  # a stacking border
    rgb = load_image(write_fits(tmp_path / "border.fits", data))
    assert (rgb[:, :10] == 0).all()
    assert np.abs(corner(rgb[:, 10:]) - corner(reference[:, 10:])).max() <= 3


def test_float_fits_in_unit_range_already_stretched_is_only_scaled(tmp_path):
    data = np.random.default_rng(0).uniform(0.2, 0.8, (40, 50)).astype(np.float32)
    rgb = load_image(write_fits(tmp_path / "processed.fits", data))
    assert np.abs(rgb[..., 0].astype(float) - data * 255).max() <= 1


def _mosaic(cube, pattern):
    """Sample an RGB cube (3, H, W) through a Bayer filter `pattern` (the array as stored)."""
    mosaic = np.zeros(cube.shape[1:], cube.dtype)
    for i, colour in enumerate(pattern):
        dy, dx = divmod(i, 2)
        mosaic[dy::2, dx::2] = cube["RGB".index(colour), dy::2, dx::2]
    return mosaic


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_bayer_mosaic_is_debayered_to_its_colours(tmp_path, pattern):
    cube = linear_frame()
    rgb = load_image(write_fits(tmp_path / "osc.fits", _mosaic(cube, pattern), BAYERPAT=pattern))
    assert rgb.shape == (60, 80, 3)  # superpixel: one RGB pixel per 2x2 cell
    red, green, blue = centre(rgb)
    assert red > green + 40 and red > blue + 40, (pattern, red, green, blue)


def test_superpixel_values_and_offsets():
    mosaic = np.array([[1, 2], [3, 4]], np.float32)  # RGGB: R=1, G=2,3, B=4
    assert debayer(mosaic, "RGGB").ravel().tolist() == [1, 2.5, 4]
    assert debayer(mosaic, "BGGR").ravel().tolist() == [4, 2.5, 1]
    big = np.arange(36, dtype=np.float32).reshape(6, 6)
    # A stored array starting one column into an RGGB pattern is a GRBG array, one row in is GBRG.
    assert (debayer(big, "RGGB", x_offset=1) == debayer(big, "GRBG")).all()
    assert (debayer(big, "RGGB", y_offset=1) == debayer(big, "GBRG")).all()
    assert (debayer(big, "RGGB", x_offset=1, y_offset=1) == debayer(big, "BGGR")).all()


def debayer(mosaic, pattern, x_offset=0, y_offset=0):
    return fits.debayer_superpixel(mosaic, pattern, x_offset, y_offset)


def test_bayer_offsets_in_the_header_are_honoured(tmp_path):
    cube = linear_frame()
    # The camera's pattern is RGGB, but the stored frame was cropped by one column: its array reads GRBG.
    path = write_fits(tmp_path / "cropped.fits", _mosaic(cube, "GRBG"), BAYERPAT="RGGB", XBAYROFF=1)
    red, green, blue = centre(load_image(path))
    assert red > green + 40 and red > blue + 40


@pytest.mark.parametrize("kind", ["Dark", "Dark Frame", "FLAT", "flat field", "Bias Frame", "DARKFLAT", "zero"])
def test_calibration_frames_are_skipped_with_a_reason(tmp_path, kind):
    path = write_fits(tmp_path / "calibration.fits", linear_frame()[0], IMAGETYP=kind)
    with pytest.raises(SkippedImage) as skipped:
        load_image(path)
    assert "calibration frame" in skipped.value.cause and kind in skipped.value.cause


def test_light_frames_are_classified(tmp_path):
    assert load_image(write_fits(tmp_path / "light.fits", linear_frame()[0], IMAGETYP="Light Frame")).shape == (120, 160, 3)


@pytest.mark.parametrize(
    "data,cause",
    [
        (np.full((20, 20), np.nan, np.float32), "all NaN"),
        (np.full((20, 20), 1234, np.uint16), "constant image"),
        (np.zeros((4, 20, 20), np.float32), "unsupported data shape"),
    ],
)
def test_fits_without_a_picture_is_an_error(tmp_path, data, cause):
    with pytest.raises(ImageError, match=cause):
        load_image(write_fits(tmp_path / "bad.fits", data))


def test_fits_with_only_a_table_or_truncated(tmp_path):
    table = astrofits.BinTableHDU.from_columns([astrofits.Column(name="flux", format="E", array=np.arange(3.0))])
    astrofits.HDUList([astrofits.PrimaryHDU(), table]).writeto(tmp_path / "table.fits")
    with pytest.raises(ImageError, match="no image HDU"):
        load_image(tmp_path / "table.fits")
    whole = write_fits(tmp_path / "whole.fits", linear_frame()[0]).read_bytes()
    (tmp_path / "cut.fits").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "cut.fits")
    assert "truncated" in str(err.value) and "\n" not in str(err.value)


def test_fits_is_recognised_by_content_and_large_frames_are_binned(tmp_path):
    path = write_fits(tmp_path / "capture.dat", linear_frame(height=480, width=640))
    rgb = load_image(path, PreprocessSpec(input_size=64))
    assert rgb.shape == (96, 128, 3)  # binned 5x: still twice the 64x48 the model needs
    red, green, blue = centre(rgb)
    assert red > green + 40


# ---------------------------------------------------------------- file-open errors: one line, never a hang


def _good_jpeg(tmp_path):
    path = tmp_path / "good.jpg"
    path.write_bytes(_jpeg_bytes())
    return path


def _one_line_error(path, cause):
    with pytest.raises(ImageError) as err:
        load_image(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert cause in err.value.cause, message
    return err.value


def test_a_symlink_loop_is_one_line(tmp_path):
    os.symlink(tmp_path / "l2.jpg", tmp_path / "l1.jpg")
    os.symlink(tmp_path / "l1.jpg", tmp_path / "l2.jpg")
    _one_line_error(tmp_path / "l1.jpg", "symlink loop")


def test_a_dangling_symlink_is_one_line(tmp_path):
    os.symlink(tmp_path / "gone.jpg", tmp_path / "link.jpg")
    _one_line_error(tmp_path / "link.jpg", "dangling symlink")


def test_a_path_through_a_file_and_a_name_too_long_are_one_line(tmp_path):
    good = _good_jpeg(tmp_path)
    _one_line_error(good / "x.jpg", "a part of it is a file")
    _one_line_error(tmp_path / ("n" * 300 + ".jpg"), "file name too long")
    assert load_image(good).shape == (64, 64, 3)


def test_a_fifo_named_like_a_jpeg_is_refused_without_waiting_for_a_writer(tmp_path):
    import threading

    fifo = tmp_path / "f.jpg"
    os.mkfifo(fifo)
    outcome = []

    def classify():
        try:
            load_image(fifo)
        except ImageError as err:
            outcome.append(err.cause)

    worker = threading.Thread(target=classify, daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # it blocked in open(): release it before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=5)
        pytest.fail("load_image blocked on a FIFO")
    assert outcome == ["not an image file: a FIFO (named pipe)"]


def test_a_character_device_is_refused(tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    _one_line_error("/dev/zero", "not an image file: a character device")


@pytest.mark.parametrize(
    "name,content,incomplete",
    [
        ("empty.jpg", b"", True),
        ("cut.jpg", _jpeg_bytes()[:600], True),
        ("cut.png", _png_bytes()[:400], True),
        ("notes.jpg", b"not a picture\n" * 20, False),
    ],
)
def test_files_cut_short_are_told_apart_from_broken_ones(tmp_path, name, content, incomplete):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / name)
    assert isinstance(err.value, decode.IncompleteImage) == incomplete


def test_a_fits_shorter_than_its_header_declares_is_incomplete(tmp_path):
    whole = write_fits(tmp_path / "whole.fits", linear_frame()[0]).read_bytes()
    for size in (1000, 2880, len(whole) - 5000):  # in the header, right after it, in the data
        (tmp_path / "cut.fits").write_bytes(whole[:size])
        with pytest.raises(decode.IncompleteImage, match="truncated FITS"):
            load_image(tmp_path / "cut.fits")


# ---------------------------------------------------------------- FITS: the pixel limit and binning on read


def _header_only_fits(path, width, height, bitpix=16, sparse=True):
    """A FITS header declaring width x height; with `sparse`, the file is extended to the full size with a hole."""
    header = astrofits.Header([("SIMPLE", True), ("BITPIX", bitpix), ("NAXIS", 2), ("NAXIS1", width), ("NAXIS2", height)])
    block = header.tostring().encode("ascii")
    with open(path, "wb") as file:
        file.write(block)
        if sparse:
            file.truncate(len(block) + width * height * abs(bitpix) // 8)
    return path


def _peak_traced_mb(function):
    import tracemalloc

    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_a_sparse_fits_declaring_900_megapixels_is_refused_from_its_header(tmp_path):
    path = _header_only_fits(tmp_path / "sparse.fits", 30000, 30000)  # 1.8 GB on paper, a few KB on disk
    assert path.stat().st_size > 1.8e9

    def decode_it():
        with pytest.raises(ImageError, match=r"declares 30000x30000 pixels \(900.0 MP\), over the limit of 89.5 MP"):
            load_image(path, PreprocessSpec(input_size=224))

    assert _peak_traced_mb(decode_it) < 20  # reading the data would take 1.8 GB as int16, 3.6 GB as float32


def test_a_tile_compressed_fits_is_limited_by_its_declared_image_size(tmp_path):
    small = tmp_path / "small.fits.fz"
    astrofits.HDUList([astrofits.PrimaryHDU(), astrofits.CompImageHDU(linear_frame()[0])]).writeto(small)
    data = small.read_bytes()
    for axis in (b"ZNAXIS1", b"ZNAXIS2"):  # the same header declaring a 20000 x 20000 image
        at = data.index(axis.ljust(8) + b"=")
        data = data[:at] + f"{axis.decode():<8}= {20000:>20}".ljust(80).encode("ascii") + data[at + 80:]
    (tmp_path / "huge.fits.fz").write_bytes(data)
    with pytest.raises(ImageError, match=r"declares 20000x20000 pixels \(400.0 MP\), over the limit"):
        load_image(tmp_path / "huge.fits.fz", PreprocessSpec(input_size=224))
    assert load_image(small).shape == (120, 160, 3)


def test_the_fits_pixel_limit_is_pils_setting(tmp_path, monkeypatch):
    path = write_fits(tmp_path / "frame.fits", linear_frame()[0])  # 160 x 120 = 19200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 19200)
    assert load_image(path).shape == (120, 160, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 19199)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(path)


@pytest.mark.parametrize("kind", ["mono", "bayer", "planes_first", "planes_last"])
def test_binning_on_read_gives_the_picture_of_binning_after(tmp_path, kind):
    cube = linear_frame(height=300, width=400, seed=5).astype(np.float32)
    cube[:, 7, 11] = np.nan  # NaNs are ignored by the block means in both
    if kind == "mono":
        data, header = cube[0], {}
    elif kind == "bayer":
        data, header = _mosaic(cube, "GRBG"), {"BAYERPAT": "GRBG"}
    else:
        data, header = (cube, {}) if kind == "planes_first" else (np.moveaxis(cube, 0, 2), {})
    path = write_fits(tmp_path / f"{kind}.fits", data, **header)
    spec = PreprocessSpec(input_size=32)
    full = load_image(path)  # no spec: read whole, no binning
    assert full.shape[:2] == ((150, 200) if kind == "bayer" else (300, 400))
    planes = data[None] if kind == "mono" else fits.debayer_superpixel(data, "GRBG") if kind == "bayer" else cube
    expected = fits.to_display(fits.bin_to(planes.astype(np.float32), spec.content_size), full_scale=None)
    binned = load_image(path, spec)
    assert binned.shape == expected.shape and binned.shape[1] >= 64
    assert np.abs(binned.astype(int) - expected.astype(int)).max() <= 1


def test_a_large_frame_is_decoded_in_a_few_megabytes(tmp_path):
    frame = np.random.default_rng(0).normal(1000, 20, (3000, 4000)).astype(np.uint16)  # 24 MB as stored
    path = write_fits(tmp_path / "large.fits", frame)
    del frame
    shape = []
    peak = _peak_traced_mb(lambda: shape.append(load_image(path, PreprocessSpec(input_size=224)).shape))
    assert shape == [(375, 500, 3)]  # binned 8x: still twice the 224 x 168 the model needs
    # Strips of at most 4 MB of float32 rows plus their block means; reading the frame whole was 24 + 48 MB.
    assert peak < 16, f"{peak:.1f} MB"


@pytest.mark.parametrize(
    "data,cause",
    [
        (np.full((20, 20), np.inf, np.float32), "no finite pixels (all infinite)"),
        (np.where(np.eye(20, dtype=bool), np.nan, np.inf).astype(np.float32), "only NaN and infinite values"),
        (np.ones((1, 1), np.float32), "image is 1x1 pixels: too small to classify"),
        (np.ones((1, 50), np.float32), "image is 50x1 pixels: too small to classify"),
    ],
)
def test_fits_without_finite_pixels_or_too_small_says_which(tmp_path, data, cause):
    _one_line_error(write_fits(tmp_path / "bad.fits", data), cause)


# ---------------------------------------------------------------- FITS without astropy: numpy reads what astropy reads


def _raw_fits(path, cards, raw):
    """A FITS file written byte by byte: `cards` as the primary header, `raw` (big-endian) as its data."""
    header = astrofits.Header([("SIMPLE", True), *cards]).tostring().encode("ascii")
    data = raw.tobytes()
    path.write_bytes(header + data + b"\0" * (-len(data) % 2880))
    return path


def _stored_variants(tmp_path):
    """One file per way FITS stores pixels, each holding the same kind of linear capture."""
    cube = linear_frame(height=130, width=170, seed=3)
    mono = cube[0]
    raw = (mono.astype(np.int32) - 1200).astype(">i2")
    raw[5, 5:9] = -32768  # BLANK: missing values of scaled data
    table = astrofits.BinTableHDU.from_columns([astrofits.Column(name="flux", format="E", array=np.arange(3.0))])
    variants = {
        "uint16 (BZERO 32768)": mono,
        "int16": (mono.astype(np.int32) - 1000).astype(np.int16),
        "uint8": np.clip((mono - 950.0) / 2, 0, 255).astype(np.uint8),
        "int8 (BZERO -128)": (np.clip((mono - 950.0) / 2, 0, 255) - 128).astype(np.int8),
        "int32": mono.astype(np.int32) * 1000,
        "uint32 (BZERO 2**31)": mono.astype(np.uint32) * 70000,
        "float32 in [0, 1]": mono.astype(np.float32) / 65535,
        "float64": mono.astype(np.float64),
        "planes first": cube,
        "planes last": np.moveaxis(cube, 0, 2).copy(),
    }
    paths = {name: write_fits(tmp_path / f"v{i}.fits", data) for i, (name, data) in enumerate(variants.items())}
    paths["bayer"] = write_fits(tmp_path / "bayer.fits", _mosaic(cube, "RGGB"), BAYERPAT="RGGB")
    paths["scaled int16 with BLANK"] = _raw_fits(tmp_path / "scaled.fits", [
        ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 170), ("NAXIS2", 130), ("BSCALE", 0.5), ("BZERO", 700.0),
        ("BLANK", -32768)], raw)
    paths["image after a table"] = tmp_path / "ext.fits"
    astrofits.HDUList([astrofits.PrimaryHDU(), table, astrofits.ImageHDU(mono)]).writeto(paths["image after a table"])
    paths["gzipped"] = tmp_path / "capture.fits.gz"
    paths["gzipped"].write_bytes(gzip.compress(paths["uint16 (BZERO 32768)"].read_bytes()))
    blank_border = (mono.astype(np.int32) - 1000).astype(np.int16)
    blank_border[:20] = -32768  # a stacked frame's border: BLANK on unscaled integers is missing data too
    paths["int16 with BLANK, unscaled"] = write_fits(tmp_path / "blank.fits", blank_border, BLANK=-32768)
    plain = paths["int16"].read_bytes()
    end = plain.index(b"END" + b" " * 77)
    paths["END then NULs (ImageMagick)"] = tmp_path / "magick.fits"
    paths["END then NULs (ImageMagick)"].write_bytes(plain[:end] + b"END\0" + plain[end + 4:])
    paths["lower-case keywords"] = tmp_path / "lower.fits"
    paths["lower-case keywords"].write_bytes(plain.replace(b"BITPIX  =", b"bitpix  =", 1))
    return paths


def test_every_stored_type_reads_as_astropy_reads_it(tmp_path):
    spec = PreprocessSpec(input_size=32)  # 170 x 130 bins 2x on read
    for name, path in _stored_variants(tmp_path).items():
        for size in (None, spec.content_size):
            ours = fits.read_fits(path, size)
            theirs = fits._read_with_astropy(path, size, None)
            assert ours.shape == theirs.shape and np.array_equal(ours, theirs), (name, size)
            assert ours.std() > 10, name  # a picture, not a flat field


def test_blank_values_of_scaled_data_are_missing_not_black_sky(tmp_path):
    raw = np.full((40, 60), 3000, ">i2")
    raw[10, 10:20] = -32768
    cards = [("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 60), ("NAXIS2", 40), ("BSCALE", 2.0), ("BZERO", 10.0), ("BLANK", -32768)]
    with open(_raw_fits(tmp_path / "blank.fits", cards, raw), "rb") as stream:
        header = first_image_header(stream)
        values = fits._StoredPixels(stream, header).read(40 * 60).reshape(40, 60)
    assert np.isnan(values[10, 10:20]).all() and np.all(values[~np.isnan(values)] == 6010.0)


def test_a_fits_without_its_padding_or_a_gzip_stream_cut_short_is_truncated(tmp_path):
    whole = write_fits(tmp_path / "whole.fits", linear_frame()[0]).read_bytes()
    data_end = 2880 + 160 * 120 * 2
    (tmp_path / "unpadded.fits").write_bytes(whole[:data_end])
    (tmp_path / "cut.fits.gz").write_bytes(gzip.compress(whole)[:3000])
    for name in ("unpadded.fits", "cut.fits.gz"):
        with pytest.raises(decode.IncompleteImage, match="truncated FITS"):
            load_image(tmp_path / name)


@pytest.mark.parametrize("content,cause", [
    (b"<html><body>404 Not Found</body></html>\n" * 100, "no SIMPLE card"),  # a failed download named .fits
    (gzip.compress(b"not a FITS file at all " * 50), "no SIMPLE card"),
], ids=["an html page", "gzipped text"])
def test_a_file_that_is_not_fits_is_not_called_truncated(tmp_path, content, cause):
    (tmp_path / "m31.fits").write_bytes(content)
    error = _one_line_error(tmp_path / "m31.fits", cause)
    assert not isinstance(error, decode.IncompleteImage)


def test_headers_fits_cannot_read_are_one_line(tmp_path):
    plain = write_fits(tmp_path / "plain.fits", linear_frame()[0]).read_bytes()
    (tmp_path / "nobitpix.fits").write_bytes(plain.replace(b"BITPIX  =", b"XBITPIX =", 1))
    _one_line_error(tmp_path / "nobitpix.fits", "no BITPIX card")
    groups = astrofits.GroupsHDU(astrofits.GroupData(np.zeros((3, 1, 4), np.float32), parnames=["u", "v"],
                                                     pardata=[np.zeros(3), np.zeros(3)]))
    groups.writeto(tmp_path / "uv.fits")  # random groups (UVFITS), no image: skipped by its true size
    _one_line_error(tmp_path / "uv.fits", "no image HDU")

    class Pipe(io.BytesIO):
        def seek(self, *args):
            raise io.UnsupportedOperation("File or stream is not seekable.")

    with pytest.raises(fits.FitsError, match="not seekable"):
        fits.read_fits(Pipe(plain))


def test_a_cut_short_file_declaring_a_huge_frame_is_not_allocated_whole(tmp_path):
    path = _header_only_fits(tmp_path / "huge.fits", 5400, 5400, bitpix=-64, sparse=False)  # 233 MB declared
    path.write_bytes(path.read_bytes() + b"\0" * 10000)

    def decode_it():
        with pytest.raises(decode.IncompleteImage, match="truncated"):
            load_image(path)  # no spec: read whole, as the review page reads

    assert _peak_traced_mb(decode_it) < 40


def test_only_tile_compressed_fits_imports_astropy(tmp_path):
    import subprocess
    import sys

    plain = write_fits(tmp_path / "plain.fits", linear_frame()[0])
    packed = tmp_path / "packed.fits.fz"
    astrofits.HDUList([astrofits.PrimaryHDU(), astrofits.CompImageHDU(linear_frame()[0])]).writeto(packed)
    code = ("import sys; from nebula.device.decode import load_image; "
            "print(load_image(sys.argv[1]).shape, 'astropy' in sys.modules)")
    for path, expected in ((plain, "(120, 160, 3) False"), (packed, "(120, 160, 3) True")):
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == expected, done.stderr[-2000:]


# ---------------------------------------------------------------- 16-bit RGB PNG and TIFF keep 16 bits


def write_png16(path, array):
    """A 16-bit RGB, RGBA or grey+alpha PNG (HxWx3, 4 or 2; PIL cannot write them), rows filtered with Sub so the
    decoder's unfiltering is exercised."""
    height, width, channels = array.shape
    step = 2 * channels
    rows = np.ascontiguousarray(array, dtype=">u2").view(np.uint8).reshape(height, width * step).astype(np.int16)
    sub = rows.copy()
    sub[:, step:] -= rows[:, :-step]
    raw = b"".join(b"\x01" + (row % 256).astype(np.uint8).tobytes() for row in sub)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, {3: 2, 4: 6, 2: 4}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_16bit_rgb_png_and_tiff_keep_their_16_bits_into_the_stretch(tmp_path):
    import tifffile

    cube = linear_frame(seed=2)  # offset 1000 + faint glow: all in the low byte's range for a 16 -> 8 bit cut
    reference = load_image(write_fits(tmp_path / "ref.fits", cube))  # FITS reads every bit
    hwc = np.moveaxis(cube, 0, 2)
    tifffile.imwrite(tmp_path / "deflate.tif", hwc, photometric="rgb", compression="zlib")
    tifffile.imwrite(tmp_path / "big_endian.tif", hwc, photometric="rgb", byteorder=">")
    for path in (write_png16(tmp_path / "rgb16.png", hwc), write_tiff16(tmp_path / "raw.tif", hwc),
                 tmp_path / "deflate.tif", tmp_path / "big_endian.tif"):
        assert (load_image(path) == reference).all(), path.name


def test_16bit_rgba_and_grey_alpha_png_keep_their_16_bits_alpha_composited_onto_black(tmp_path):
    cube = linear_frame(seed=2)  # all in the low byte's range for a 16 -> 8 bit cut: the 8-bit path loses it
    hwc = np.moveaxis(cube, 0, 2)
    opaque = np.full(hwc.shape[:2] + (1,), 65535, np.uint16)
    rgba = write_png16(tmp_path / "rgba16.png", np.concatenate([hwc, opaque], axis=2))
    grey_alpha = write_png16(tmp_path / "la16.png", np.concatenate([hwc[..., :1], opaque], axis=2))
    assert (load_image(rgba) == load_image(write_fits(tmp_path / "rgb.fits", cube))).all()
    assert (load_image(grey_alpha) == load_image(write_fits(tmp_path / "grey.fits", cube[0]))).all()
    # Part transparent: each pixel times its alpha, as the 8-bit path's composite onto black does.
    alpha = np.linspace(0.5, 1.0, hwc.shape[1])[None, :] * np.ones(hwc.shape[:2])
    alpha16 = np.round(alpha * 65535).astype(np.uint16)
    composited = cube * (alpha16 / 65535.0)[None].astype(np.float32)
    got = load_image(write_png16(tmp_path / "half.png", np.concatenate([hwc, alpha16[..., None]], axis=2)))
    assert np.abs(got.astype(int) - load_image(write_fits(tmp_path / "half.fits", composited.astype(np.float32)))).max() <= 1


def test_a_finished_16bit_rgba_png_matches_the_8bit_path_within_one_step(tmp_path):
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 65536, (40, 50, 4)).astype(np.uint16)
    rgba[..., 3] = rng.integers(20000, 65536, (40, 50))  # bright (not linear) and part transparent
    eight = tmp_path / "rgba8.png"
    Image.fromarray(np.round(rgba / 257.0).astype(np.uint8), "RGBA").save(eight)
    got = load_image(write_png16(tmp_path / "rgba16.png", rgba)).astype(int)
    assert np.abs(got - load_image(eight).astype(int)).max() <= 1
    grey_alpha = rgba[..., [0, 3]]
    Image.fromarray(np.round(grey_alpha / 257.0).astype(np.uint8), "LA").save(tmp_path / "la8.png")
    got = load_image(write_png16(tmp_path / "la16.png", grey_alpha)).astype(int)
    assert np.abs(got - load_image(tmp_path / "la8.png").astype(int)).max() <= 1


def test_16bit_rgb_is_binned_before_the_stretch_with_a_spec(tmp_path):
    hwc = np.moveaxis(linear_frame(height=480, width=640), 0, 2)
    rgb = load_image(write_png16(tmp_path / "big16.png", hwc), PreprocessSpec(input_size=64))
    assert rgb.shape == (96, 128, 3)
    red, green, blue = centre(rgb)
    assert red > green + 40 and red > blue + 40


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from Linux /proc")
def test_a_9576x6388_frame_decodes_within_a_small_pis_memory(tmp_path):
    """An IMX455 full frame (9576 x 6388, 16 bit: 122 MB on disk): peak RSS of a fresh process decoding it.

    Read whole, it took 0.8 GB (uint16 data, a float32 copy, the binning's copies); binned on
    read in 4 MB strips by numpy alone, the peak is the imports (numpy, PIL: about 35 MB) plus a few
    strips: 45 MB here. Through astropy, as before, it was 70 MB; the bound below holds the difference.
    """
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    frame = (1000 + rng.normal(0, 20, (6388, 9576))).astype(np.uint16)
    path = write_fits(tmp_path / "imx455.fits", frame)
    del frame
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest, with TensorFlow loaded).
    code = ("import sys; from nebula.device.decode import load_image; from nebula.device.preprocess import PreprocessSpec; "
            "shape = load_image(sys.argv[1], PreprocessSpec(input_size=224)).shape; "
            "print(shape, next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shape, peak_kb = done.stdout.rsplit(" ", 1)
    print(f"peak RSS decoding a 9576x6388 uint16 FITS: {int(peak_kb) / 1024:.0f} MB")
    assert shape == "(304, 456, 3)"  # binned 21x
    assert int(peak_kb) / 1024 < 60


@pytest.mark.parametrize("size,decoded", [((1024, 768), (256, 192)), ((2000, 1500), (250, 188)), ((300, 200), (300, 200))])
def test_jpeg_decodes_at_the_smallest_dct_scale_not_below_the_model_input(tmp_path, size, decoded):
    """PIL's draft: 1/2, 1/4 or 1/8 of the file, the smallest that still covers the 224 px content (224x168 for 4:3)."""
    path = tmp_path / "frame.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    spec = PreprocessSpec(input_size=224)
    rgb = load_image(path, spec)
    assert (rgb.shape[1], rgb.shape[0]) == decoded
    content = spec.content_size(*size)
    assert rgb.shape[1] >= content[0] and rgb.shape[0] >= content[1]
    assert load_image(path).shape[:2] == (size[1], size[0])  # without a spec, the full picture
