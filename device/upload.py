"""Receiving one uploaded photo: the request body streamed to a file, never held in memory.

`receive` reads a request body of at most `max_bytes` in 64 KB chunks and
writes the photo's bytes to a file in a folder the caller owns (the web page
uses a private temporary folder): the raw body, or the file part of a
``multipart/form-data`` body, found by a streaming parser that keeps no more
than one chunk and one boundary in memory. Whatever the upload's size, it
costs the server a chunk of memory, not a copy of the photo.

Each way a body can be wrong is an `UploadError` with its HTTP status and one
line: no or a non-numeric Content-Length (411, 400), a negative one (400), one
over the limit (413), chunked encoding (411), a body that ends before its
Content-Length (400), one that stalls (408: the socket's timeout, set by the
server), a multipart body without the file or its closing boundary (400).
"""

from __future__ import annotations

import email.message
import socket
from http import HTTPStatus
from pathlib import Path

CHUNK = 64 * 1024
_MAX_PART_HEADERS = 16 * 1024


class UploadError(Exception):
    """A bad upload: `status` is the HTTP status, str() the message shown to the user."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def content_length(headers, max_bytes: int) -> int:
    """The body's declared length, checked against the limit; UploadError when it is missing, wrong or too large."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        raise UploadError(HTTPStatus.LENGTH_REQUIRED, "send the upload with a Content-Length (chunked is not accepted)")
    declared = headers.get("Content-Length")
    if declared is None:
        raise UploadError(HTTPStatus.LENGTH_REQUIRED, "the upload needs a Content-Length header")
    try:
        length = int(declared.strip())
    except ValueError:
        raise UploadError(HTTPStatus.BAD_REQUEST, f"Content-Length is not a number of bytes: {declared[:40]!r}") from None
    if length < 0:
        raise UploadError(HTTPStatus.BAD_REQUEST, f"Content-Length must be 0 or more, not {length}")
    if length > max_bytes:
        raise UploadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"upload too large: {length / 2**20:.1f} MB, the limit is {max_bytes / 2**20:.0f} MB")
    return length


class Body:
    """Exactly `length` bytes of a request body, in chunks: an early end or a stall is an UploadError."""

    def __init__(self, rfile, length: int, stall_s: float | None = None):
        self.rfile, self.length, self.left, self.stall_s = rfile, length, length, stall_s

    def read(self, size: int = CHUNK) -> bytes:
        """Up to `size` bytes; b"" only once the whole body has been read."""
        if self.left == 0:
            return b""
        reader = getattr(self.rfile, "read1", self.rfile.read)
        try:
            chunk = reader(min(size, self.left))
        except (TimeoutError, socket.timeout):  # the socket's timeout (distinct classes before Python 3.10): the client stopped
            waited = f" for {self.stall_s:g} s" if self.stall_s else ""
            raise UploadError(HTTPStatus.REQUEST_TIMEOUT, f"upload stalled: no data{waited} after "
                              f"{self.length - self.left} of {self.length} bytes") from None
        if not chunk:
            raise UploadError(HTTPStatus.BAD_REQUEST, f"upload cut short: {self.length - self.left} of {self.length} bytes arrived")
        self.left -= len(chunk)
        return chunk

    def discard(self) -> None:
        while self.read():
            pass


def receive(body: Body, content_type: str, target: Path, raw_name: str = "upload", field: str = "image") -> str:
    """Write the photo of `body` to `target`; returns its file name (the multipart part's, else `raw_name`)."""
    with open(target, "wb") as out:
        if content_type.lower().startswith("multipart/form-data"):
            name = _multipart_file(body, content_type, out, field)
        else:
            name = raw_name
            while chunk := body.read():
                out.write(chunk)
    body.discard()  # a multipart epilogue
    return name


def _multipart_file(body: Body, content_type: str, out, field: str) -> str:
    """Stream the part named `field` (else the first part with a filename) into `out`; returns its filename."""
    boundary = _header_param(content_type, "content-type", "boundary")
    if not boundary:
        raise UploadError(HTTPStatus.BAD_REQUEST, "multipart upload without a boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    stream = _Stream(body, b"\r\n")  # the body's first delimiter has no line end before it
    found, ended = None, not stream.copy_until(delimiter, None)  # the preamble
    while not ended and stream.peek(2) != b"--":  # "--" after a delimiter: the closing one
        name, filename = _part_names(stream.read_until(b"\r\n\r\n", _MAX_PART_HEADERS))
        take = name == field or (found is None and filename is not None)
        if take:
            out.seek(0)
            out.truncate()
        ended = not stream.copy_until(delimiter, out if take else None)
        if take and ended:
            raise UploadError(HTTPStatus.BAD_REQUEST, "malformed multipart upload (the file part has no closing boundary)")
        if take:
            found = filename or "upload"
            if name == field:
                break
    if found is None:
        raise UploadError(HTTPStatus.BAD_REQUEST, f"no file in the upload: send it in the '{field}' field")
    return found


class _Stream:
    """A body read forward with at most one chunk plus a delimiter held."""

    def __init__(self, body: Body, start: bytes = b""):
        self.body, self.buffer = body, start

    def _more(self) -> bool:
        chunk = self.body.read()
        self.buffer += chunk
        return bool(chunk)

    def peek(self, size: int) -> bytes:
        while len(self.buffer) < size and self._more():
            pass
        return self.buffer[:size]

    def copy_until(self, delimiter: bytes, sink) -> bool:
        """Pass everything before `delimiter` to `sink` (None: drop it) and consume it; False: the body ended first."""
        while True:
            at = self.buffer.find(delimiter)
            if at >= 0:
                if sink is not None:
                    sink.write(self.buffer[:at])
                self.buffer = self.buffer[at + len(delimiter):]
                return True
            keep = len(delimiter) - 1  # a delimiter may straddle two chunks
            if len(self.buffer) > keep:
                if sink is not None:
                    sink.write(self.buffer[:-keep])
                self.buffer = self.buffer[-keep:]
            if not self._more():
                return False

    def read_until(self, end: bytes, limit: int) -> bytes:
        """The bytes before `end` (consumed), at most `limit` of them."""
        while (at := self.buffer.find(end)) < 0:
            if len(self.buffer) > limit or not self._more():
                raise UploadError(HTTPStatus.BAD_REQUEST, "malformed multipart upload (a part without headers)")
        head, self.buffer = self.buffer[:at], self.buffer[at + len(end):]
        return head


def _part_names(head: bytes) -> tuple[str | None, str | None]:
    disposition = next(
        (line.split(b":", 1)[1].decode("utf-8", "replace").strip()
         for line in head.split(b"\r\n") if line.lower().startswith(b"content-disposition:")),
        "",
    )
    return _header_param(disposition, "content-disposition", "name"), _header_param(disposition, "content-disposition", "filename")


def _header_param(value: str, header: str, param: str) -> str | None:
    message = email.message.Message()
    message[header] = value
    return message.get_param(param, header=header) if param != "filename" else message.get_filename()
