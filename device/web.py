"""The local web page: the latest frame with its label and history, and an upload form.

Standard library only (``http.server``), so the Pi needs no web framework. Served
by ``nebula run --web`` (live results) and ``nebula serve`` (uploads only).
Bound to 127.0.0.1 unless a host is given.

- ``GET /``: the page; it polls ``/api/latest`` every two seconds.
- ``GET /api/latest``: ``{"latest": record | null, "history": [...], "image": url | null, "model": {...}}``.
- ``GET /latest.jpg``: the latest frame (downscaled), encoded when asked for.
- ``POST /api/classify``: a photo as ``multipart/form-data`` (field ``image``) or as the raw
  body (name in ``X-Filename``); answers a `ResultRecord` (``nebula.device.record``) like
  the results log's, classified by the same `classify_file` as ``nebula classify``, or
  ``{"error": "..."}`` with a 4xx status.

Uploads: at most `max_upload` bytes (413 beyond); the type is checked by content
(the magic bytes of `nebula.device.formats`; 415 otherwise); the bytes are written only
to a private temporary folder (``tempfile.mkdtemp``: mode 0700) under a fixed name,
decoded in-process (never handed to a shell), and deleted at once. The page puts
every text in with ``textContent``, so nothing from a file name or a model label
is ever parsed as HTML.
"""

from __future__ import annotations

import email.message
import io
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from nebula.device import formats
from nebula.device.config import RunConfig

MAX_UPLOAD = 25 * 1024 * 1024
_DRAIN_FACTOR = 4  # read and discard a too-large body up to 4x the limit, so the client sees the 413
_PREVIEW_MAX_SIDE = 800
_CHUNK = 64 * 1024

_STATIC = {
    "/": ("templates/index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("static/app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("static/style.css", "text/css; charset=utf-8"),
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class WebServerError(Exception):
    """The page cannot be served (the port is taken, the address is not ours); one line."""


class UploadError(Exception):
    """A bad upload: `status` is the HTTP status, str() the message shown to the user."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def _header_param(value: str, header: str, param: str) -> str | None:
    message = email.message.Message()
    message[header] = value
    return message.get_param(param, header=header) if param != "filename" else message.get_filename()


def parse_multipart(body: bytes, content_type: str, field: str = "image") -> tuple[str, bytes]:
    """(filename, bytes) of the file part named `field` (else the first part with a filename)."""
    boundary = _header_param(content_type, "content-type", "boundary")
    if not boundary:
        raise UploadError(HTTPStatus.BAD_REQUEST, "multipart upload without a boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    segments = (b"\r\n" + body).split(delimiter)
    found = None
    for segment in segments[1:]:
        if segment.startswith(b"--"):
            break
        head, separator, content = segment.partition(b"\r\n\r\n")
        if not separator:
            raise UploadError(HTTPStatus.BAD_REQUEST, "malformed multipart upload (a part without headers)")
        disposition = next(
            (line.split(b":", 1)[1].decode("utf-8", "replace").strip()
             for line in head.split(b"\r\n") if line.lower().startswith(b"content-disposition:")),
            "",
        )
        name = _header_param(disposition, "content-disposition", "name")
        filename = _header_param(disposition, "content-disposition", "filename")
        if name == field or (found is None and filename is not None):
            found = (filename or "upload", content)
            if name == field:
                break
    if found is None:
        raise UploadError(HTTPStatus.BAD_REQUEST, f"no file in the upload: send it in the '{field}' field")
    return found


def _display_name(filename: str) -> str:
    """Just the base name, printable, at most 200 characters: it is only ever shown, never used as a path."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in base if ch.isprintable())[:200] or "upload"


class LiveState:
    """The latest result and its picture, and a short history, shared with the page (thread-safe)."""

    def __init__(self, history: int = 30):
        self._lock = threading.Lock()
        self._latest: dict | None = None
        self._image: np.ndarray | None = None
        self._history: deque[dict] = deque(maxlen=history)
        self._sequence = 0
        self._jpeg: tuple[int, bytes] | None = None

    def update(self, record: dict, frame=None) -> None:
        """Daemon callback: a new results line and the frame it came from."""
        image = None
        if frame is not None and "label" in record:  # a broken frame does not replace the last good picture
            image = frame.preview if frame.preview is not None else frame.rgb
        short = {k: record[k] for k in ("frame", "file", "label", "score", "error", "skipped", "utc") if k in record}
        with self._lock:
            self._sequence += 1
            self._latest = record
            self._history.appendleft(short)
            if image is not None:
                self._image = image

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "latest": self._latest,
                "history": list(self._history),
                "image": f"/latest.jpg?v={self._sequence}" if self._image is not None else None,
                "count": self._sequence,
            }

    def latest_jpeg(self) -> bytes | None:
        """The latest picture as a JPEG, encoded once per new picture."""
        from PIL import Image

        with self._lock:
            sequence, image, cached = self._sequence, self._image, self._jpeg
        if image is None:
            return None
        if cached is not None and cached[0] == sequence:
            return cached[1]
        picture = Image.fromarray(image)
        picture.thumbnail((_PREVIEW_MAX_SIDE, _PREVIEW_MAX_SIDE))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        with self._lock:
            self._jpeg = (sequence, data)
        return data


class WebApp:
    """What the request handler needs: the model (behind a lock), the live state, the limits."""

    def __init__(self, classifier, state: LiveState | None = None, lock: threading.Lock | None = None,
                 max_upload: int = MAX_UPLOAD, threshold: float = RunConfig.threshold, top_k: int = RunConfig.top_k,
                 identifier=None):
        self.classifier = classifier
        self.identifier = identifier  # nebula.device.identify.Identifier: the catalog's answer beside the model's
        self.state = state or LiveState()
        self.lock = lock or threading.Lock()
        self.max_upload, self.threshold, self.top_k = max_upload, threshold, top_k

    def model_info(self) -> dict:
        return {"labels": self.classifier.labels, "sha256": self.classifier.sha256, "name": Path(self.classifier.path).name}

    def classify_upload(self, filename: str, data: bytes) -> dict:
        """Check, decode and classify one uploaded photo; raises UploadError with a clear message."""
        from nebula.device.classify import classify_file

        name = _display_name(filename)
        if not data:
            raise UploadError(HTTPStatus.BAD_REQUEST, f"{name}: empty upload")
        kind = formats.by_content(data[: formats.HEAD_BYTES])
        if kind is None:
            raise UploadError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"{name}: not a {formats.names_text()} image (checked by content)")
        folder = tempfile.mkdtemp(prefix="nebula-upload-")  # mode 0700: private to this user
        try:
            path = Path(folder, "upload" + kind.suffixes[0])
            path.write_bytes(data)
            result = classify_file(self.classifier, path, top_k=self.top_k, threshold=self.threshold, lock=self.lock,
                                   identifier=self.identifier)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if result.skipped is not None:
            raise UploadError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{name}: not classified: {result.skipped}")
        if result.error is not None:
            raise UploadError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{name}: {result.error}")
        record = result.record(self.classifier.sha256)
        record.file = name
        record.decode_ms = round(result.timings_ms["decode"], 3)
        width, height = result.image_size
        record.extras = {"type": kind.name, "width": width, "height": height}
        return record.to_dict()


class _Handler(BaseHTTPRequestHandler):
    server_version = "nebula-classifier"
    timeout = 60  # a stalled client does not hold a thread forever

    @property
    def app(self) -> WebApp:
        return self.server.app

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # the page polls every two seconds: no access log on the Pi's SD card

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in _SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = urlsplit(self.path).path
        if path in _STATIC:
            resource, content_type = _STATIC[path]
            body = resources.files("nebula.device").joinpath(resource).read_bytes()
            return self._send(HTTPStatus.OK, body, content_type)
        if path == "/api/latest":
            return self._json(HTTPStatus.OK, {**self.app.state.snapshot(), "model": self.app.model_info()})
        if path == "/latest.jpg":
            data = self.app.state.latest_jpeg()
            if data is None:
                return self._json(HTTPStatus.NOT_FOUND, {"error": "no frame yet"})
            return self._send(HTTPStatus.OK, data, "image/jpeg")
        return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_POST(self):  # noqa: N802
        path = urlsplit(self.path).path
        if path != "/api/classify":
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {path}"})
        try:
            filename, data = self._read_upload()
            result = self.app.classify_upload(filename, data)
        except UploadError as err:
            return self._json(err.status, {"error": str(err)})
        except Exception as err:  # noqa: BLE001 - the server must go on; the client and the log get one line
            print(f"web: upload failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error ({type(err).__name__})"})
        return self._json(HTTPStatus.OK, result)

    def _read_upload(self) -> tuple[str, bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise UploadError(HTTPStatus.LENGTH_REQUIRED, "send the upload with a Content-Length (chunked is not accepted)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise UploadError(HTTPStatus.LENGTH_REQUIRED, "the upload needs a Content-Length header") from None
        limit = self.app.max_upload
        if length > limit:
            self.close_connection = True
            if length <= _DRAIN_FACTOR * limit:
                self._discard(length)
            raise UploadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"upload too large: {length / 2**20:.1f} MB, the limit is {limit / 2**20:.0f} MB")
        body = self.rfile.read(length)
        if len(body) != length:
            raise UploadError(HTTPStatus.BAD_REQUEST, f"upload cut short: {len(body)} of {length} bytes arrived")
        content_type = self.headers.get("Content-Type", "")
        if content_type.lower().startswith("multipart/form-data"):
            return parse_multipart(body, content_type)
        return self.headers.get("X-Filename", "upload"), body

    def _discard(self, length: int) -> None:
        left = length
        while left > 0:
            chunk = self.rfile.read(min(_CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class RunningServer:
    """A server answering in a background thread; `stop()` shuts it down."""

    httpd: _Server
    thread: threading.Thread

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}/"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def make_server(classifier, host: str = "127.0.0.1", port: int = 8080, **app_options) -> _Server:
    try:
        httpd = _Server((host, port), _Handler)
    except OSError as err:
        raise WebServerError(f"cannot serve the web page on {host}:{port} ({err.strerror or err})") from None
    httpd.app = WebApp(classifier, **app_options)
    return httpd


def start_server(classifier, host: str = "127.0.0.1", port: int = 8080, **app_options) -> RunningServer:
    """Serve in a background thread (for `nebula run --web` and tests); port 0 picks a free one."""
    httpd = make_server(classifier, host, port, **app_options)
    thread = threading.Thread(target=httpd.serve_forever, name="nebula-web", daemon=True)
    thread.start()
    return RunningServer(httpd, thread)


def serve(classifier, host: str = "127.0.0.1", port: int = 8080, announce=print, **app_options) -> None:
    """Serve in the foreground until SIGTERM or SIGINT (`nebula serve`)."""
    import signal

    stopped = threading.Event()
    # Handlers first: once the page is announced, a SIGTERM must stop it cleanly.
    previous = {sig: signal.signal(sig, lambda *_: stopped.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = None
    try:
        server = start_server(classifier, host, port, **app_options)
        announce(f"web page: {server.url}")
        while not stopped.is_set():
            time.sleep(0.2)  # a plain sleep: signal handlers run between slices
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if server is not None:
            server.stop()
