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

Uploads: at most `max_upload` bytes (413 beyond); at most ``max_uploads`` at once
(503 with ``Retry-After`` beyond); the body is streamed (`nebula.device.upload`) to
a private temporary folder (``tempfile.mkdtemp``: mode 0700) under a fixed name,
never held in memory; a client silent for ``upload_timeout_s`` gets 408; the type
is checked by content (the magic bytes of `nebula.device.formats`; 415 otherwise);
the file is decoded in-process by the decoder every input uses (the same pixel
limit; never handed to a shell), and deleted at once. Other methods get 405 with
``Allow``, and every answer, http.server's own errors included, is JSON. The page puts
every text in with ``textContent``, so nothing from a file name or a model label
is ever parsed as HTML.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from nebula.device import formats, review_page
from nebula.device.config import RunConfig
from nebula.device.upload import Body, UploadError, content_length, receive

MAX_UPLOAD = 25 * 1024 * 1024
_DRAIN_FACTOR = 4  # read and discard a too-large body up to 4x the limit, so the client sees the 413
_PREVIEW_MAX_SIDE = 800
_RETRY_AFTER_S = 5  # what a client told 503 (all upload slots busy) should wait
_ALLOWED = {"/api/classify": "POST"}  # every other page: GET, HEAD

_STATIC = {
    "/": ("templates/index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("static/app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("static/style.css", "text/css; charset=utf-8"),
    **review_page.STATIC,
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class WebServerError(Exception):
    """The page cannot be served (the port is taken, the address is not ours); one line."""


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
    """What the request handler needs: the model (behind a lock), the live state, the limits.

    `max_uploads` uploads are received and classified at once (a semaphore): each costs
    a file of at most `max_upload` bytes in its private folder and one decode, so
    memory is bounded by `max_uploads` decodes whatever the load; more get 503.
    The decodes run on a pool of `max_uploads` long-lived threads, not on the
    request's own new thread: glibc gives threads their own malloc arenas, and a
    decode on every new thread would leave its freed megabytes in yet another
    arena (measured here with a throwaway script: 24 decodes of an 8 MB PNG, two
    at a time, grew the peak RSS by 151 MB on fresh threads, 55 MB on a pool of two).
    """

    def __init__(self, classifier, state: LiveState | None = None, lock: threading.Lock | None = None,
                 max_upload: int = MAX_UPLOAD, threshold: float = RunConfig.threshold, top_k: int = RunConfig.top_k,
                 max_uploads: int = RunConfig.max_uploads, upload_timeout_s: float = RunConfig.upload_timeout_s,
                 review=None, identifier=None):
        self.classifier = classifier
        self.identifier = identifier  # nebula.device.identify.Identifier: the catalog's answer beside the model's
        self.state = state or LiveState()
        self.lock = lock or threading.Lock()
        self.max_upload, self.threshold, self.top_k = max_upload, threshold, top_k
        self.review = review  # a nebula.device.review.ReviewQueue, or None: the review view says it is off
        self.upload_slots = threading.BoundedSemaphore(max_uploads)
        self.max_uploads, self.upload_timeout_s = max_uploads, upload_timeout_s
        self._decoders = ThreadPoolExecutor(max_workers=max_uploads, thread_name_prefix="nebula-decode")

    def close(self) -> None:
        self._decoders.shutdown(wait=True)

    def model_info(self) -> dict:
        return {"labels": self.classifier.labels, "sha256": self.classifier.sha256, "name": Path(self.classifier.path).name}

    def classify_upload(self, filename: str, path: Path) -> dict:
        """Check, decode and classify one uploaded photo, received at `path`; raises UploadError with a clear message."""
        from nebula.device.classify import classify_file

        name = _display_name(filename)
        with open(path, "rb") as file:
            head = file.read(formats.HEAD_BYTES)
        if not head:
            raise UploadError(HTTPStatus.BAD_REQUEST, f"{name}: empty upload")
        kind = formats.by_content(head)
        if kind is None:
            raise UploadError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"{name}: not a {formats.names_text()} image (checked by content)")
        typed = path.with_name("upload" + kind.suffixes[0])  # the decoder knows FITS by name too
        path.rename(typed)
        # The same decoder as every input: the same pixel limit, binning and one-line errors.
        result = self._decoders.submit(classify_file, self.classifier, typed, top_k=self.top_k, threshold=self.threshold,
                                       lock=self.lock, identifier=self.identifier).result()
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

    @property
    def app(self) -> WebApp:
        return self.server.app

    def setup(self):
        self.timeout = self.app.upload_timeout_s  # the socket's: a client silent this long is dropped (408 mid-upload)
        super().setup()

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # the page polls every two seconds: no access log on the Pi's SD card

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in {**_SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json", headers)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, an unknown method) as JSON, like every other answer."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._json(code, {"error": message or phrase})

    def _not_allowed(self, path: str):
        allowed = _ALLOWED.get(path, "GET, HEAD")
        return self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command} is not allowed on {path}: use {allowed}"},
                          {"Allow": allowed})

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
        if path.startswith(review_page.PREFIXES):
            return self._send(*review_page.get(self.app.review, self.app.classifier.labels, path))
        if path in _ALLOWED:
            return self._not_allowed(path)
        return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    do_HEAD = do_GET

    def _refuse_method(self):
        path = urlsplit(self.path).path
        self.close_connection = True  # a body we do not read may follow
        if path in _ALLOWED or path in _STATIC or path in ("/api/latest", "/latest.jpg"):
            return self._not_allowed(path)
        return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def do_POST(self):  # noqa: N802
        path = urlsplit(self.path).path
        if path.startswith("/api/review/"):
            status, body, content_type = review_page.post(self.app.review, self.app.classifier.labels, path, self.headers, self.rfile)
            self.close_connection = self.close_connection or status >= 400  # a refused request's body may be unread
            return self._send(status, body, content_type)
        if path != "/api/classify":
            return self._refuse_method()
        if not self.app.upload_slots.acquire(blocking=False):
            return self._busy()
        try:
            status, payload = self._receive_and_classify()
        finally:
            self.app.upload_slots.release()
        return self._json(status, payload)

    def _receive_and_classify(self) -> tuple[int, dict]:
        """(status, JSON answer) for the upload in this request; its folder is gone before the answer is sent."""
        body = None
        folder = Path(tempfile.mkdtemp(prefix="nebula-upload-"))  # mode 0700: private to this user
        try:
            body = Body(self.rfile, content_length(self.headers, self.app.max_upload), self.app.upload_timeout_s)
            received = folder / "upload.part"
            filename = receive(body, self.headers.get("Content-Type", ""), received, self.headers.get("X-Filename", "upload"))
            return HTTPStatus.OK, self.app.classify_upload(filename, received)
        except UploadError as err:
            self._after_refusal(err, body)
            return err.status, {"error": str(err)}
        except Exception as err:  # noqa: BLE001 - the server must go on; the client and the log get one line
            self.close_connection = True
            print(f"web: upload failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error ({type(err).__name__})"}
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _after_refusal(self, err: UploadError, body: Body | None) -> None:
        """A body left unread ends the connection; a too-large one is read away first (up to a bound), so the client sees the 413."""
        if body is not None and body.left == 0:
            return
        self.close_connection = True
        if err.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
            declared = int(self.headers.get("Content-Length", "0"))
            if declared <= _DRAIN_FACTOR * self.app.max_upload:
                try:
                    Body(self.rfile, declared, self.app.upload_timeout_s).discard()
                except UploadError:
                    pass  # the client stopped or left: it gets the 413 if it still listens

    def _busy(self):
        """Every upload slot is taken: 503 with Retry-After, after reading the body away (no memory: chunk by chunk)."""
        try:
            Body(self.rfile, content_length(self.headers, self.app.max_upload), self.app.upload_timeout_s).discard()
        except UploadError:
            self.close_connection = True
        return self._json(HTTPStatus.SERVICE_UNAVAILABLE,
                          {"error": f"busy: {self.app.max_uploads} upload{'s' if self.app.max_uploads != 1 else ''} "
                                    f"already in progress (the limit); try again in {_RETRY_AFTER_S} s"},
                          {"Retry-After": str(_RETRY_AFTER_S)})


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
        self.httpd.app.close()


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
