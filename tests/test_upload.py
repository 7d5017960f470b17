"""Receiving an upload: streamed to a file, exact bytes, one clear status and line for each bad body."""

import io
import os
import tracemalloc

import pytest

from nebula.device.upload import Body, UploadError, content_length, receive


class Trickle(io.RawIOBase):
    """A body that arrives a few bytes at a time, as a slow network gives it."""

    def __init__(self, data: bytes, step: int = 7):
        self.data, self.at, self.step = data, 0, step

    def read1(self, size=-1):
        chunk = self.data[self.at : self.at + min(self.step, size if size >= 0 else self.step)]
        self.at += len(chunk)
        return chunk

    read = read1


def multipart(parts, boundary="----nebulaBoundary7MA4YWxk"):
    body = b"preamble, ignored\r\n"
    for headers, content in parts:
        body += f"--{boundary}\r\n".encode() + headers.encode() + b"\r\n\r\n" + content + b"\r\n"
    return body + f"--{boundary}--\r\nepilogue".encode(), f"multipart/form-data; boundary={boundary}"


def _receive(data, content_type, tmp_path, step=7):
    target = tmp_path / "upload.part"
    name = receive(Body(Trickle(data, step), len(data)), content_type, target)
    return name, target.read_bytes()


def test_multipart_file_bytes_are_exact_even_with_boundary_lookalikes_across_chunks(tmp_path):
    photo = bytes(range(256)) * 40 + b"\r\n------nebulaBoundary7MA4YWx" + os.urandom(3000) + b"\r\n--"
    body, content_type = multipart([
        ('Content-Disposition: form-data; name="note"', b"seen at 02:00"),
        ('Content-Disposition: form-data; name="other"; filename="first.jpg"', b"not this one"),
        ('Content-Disposition: form-data; name="image"; filename="M 42.png"\r\nContent-Type: image/png', photo),
    ])
    for step in (1, 7, 64 * 1024):
        assert _receive(body, content_type, tmp_path, step) == ("M 42.png", photo)


def test_without_an_image_field_the_first_file_part_is_taken(tmp_path):
    body, content_type = multipart([('Content-Disposition: form-data; name="photo"; filename="a.jpg"', b"JPEGDATA")])
    assert _receive(body, content_type, tmp_path) == ("a.jpg", b"JPEGDATA")


def test_a_raw_body_is_the_file(tmp_path):
    assert _receive(b"raw bytes" * 1000, "image/jpeg", tmp_path) == ("upload", b"raw bytes" * 1000)


@pytest.mark.parametrize(
    "headers,status,message",
    [
        ({}, 411, "needs a Content-Length"),
        ({"Content-Length": "-5"}, 400, "Content-Length must be 0 or more, not -5"),
        ({"Content-Length": "lots"}, 400, "Content-Length is not a number of bytes: 'lots'"),
        ({"Content-Length": str(26 * 2**20)}, 413, "upload too large: 26.0 MB, the limit is 25 MB"),
        ({"Content-Length": "10", "Transfer-Encoding": "chunked"}, 411, "chunked is not accepted"),
    ],
)
def test_bad_content_lengths_are_4xx_with_a_message(headers, status, message):
    with pytest.raises(UploadError) as err:
        content_length(headers, 25 * 2**20)
    assert err.value.status == status and message in str(err.value)


def test_a_body_shorter_than_its_content_length_is_400(tmp_path):
    with pytest.raises(UploadError) as err:
        receive(Body(io.BytesIO(b"x" * 10), 20), "image/jpeg", tmp_path / "u")
    assert err.value.status == 400 and "upload cut short: 10 of 20 bytes arrived" in str(err.value)


def test_a_stalled_body_is_408(tmp_path):
    class Stalled(Trickle):
        def read1(self, size=-1):
            if self.at >= 5:
                raise TimeoutError("timed out")
            return super().read1(size)

    with pytest.raises(UploadError) as err:
        receive(Body(Stalled(b"x" * 100, 5), 100, stall_s=3), "image/jpeg", tmp_path / "u")
    assert err.value.status == 408 and str(err.value) == "upload stalled: no data for 3 s after 5 of 100 bytes"


@pytest.mark.parametrize(
    "body,message",
    [
        (b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\nDATA without an end", "the file part has no closing boundary"),
        (b"--B\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\ntext, cut", "no file in the upload"),
        (b"--B\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\ntext\r\n--B--\r\n", "no file in the upload"),
        (b"--B\r\n" + b"X" * 20000, "a part without headers"),
    ],
)
def test_malformed_multipart_is_400(tmp_path, body, message):
    with pytest.raises(UploadError, match=message):
        receive(Body(io.BytesIO(body), len(body)), "multipart/form-data; boundary=B", tmp_path / "u")


def test_an_8_mb_upload_is_received_in_well_under_a_megabyte(tmp_path):
    photo = os.urandom(8 * 2**20)
    body, content_type = multipart([('Content-Disposition: form-data; name="image"; filename="big.jpg"', photo)])
    source = io.BufferedReader(io.BytesIO(body))
    tracemalloc.start()
    try:
        receive(Body(source, len(body)), content_type, tmp_path / "u")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (tmp_path / "u").read_bytes() == photo
    assert peak < 2**20, f"{peak / 2**20:.2f} MB"
