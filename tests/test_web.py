"""The web page: a real server on 127.0.0.1, its JSON API over urllib, and the upload form
driven in headless Chromium over the DevTools protocol (a small stdlib WebSocket client)."""

import base64
import io
import json
import os
import queue
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from conftest import sky_image
from nebula.device.camera import Frame
from nebula.device.config import RunConfig
from nebula.device.runtime import Classifier
from nebula.device.upload import Body, receive
from nebula.device.web import LiveState, WebServerError, start_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classifier(tiny_model_file):
    return Classifier(tiny_model_file, num_threads=1)


@pytest.fixture
def server(classifier):
    running = start_server(classifier, "127.0.0.1", 0, state=LiveState())
    yield running
    running.stop()


def _png(label="emission", seed=0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(sky_image(label, seed=seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def _multipart(filename: str, data: bytes, field="image"):
    boundary = "----nebulatest" + os.urandom(8).hex()
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _call(url, data=None, headers=None):
    """(status, parsed JSON or raw bytes, headers) for a GET, or a POST when data is given."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, body, head = response.status, response.read(), response.headers
    except urllib.error.HTTPError as err:
        status, body, head = err.code, err.read(), err.headers
    if head.get("Content-Type") == "application/json":
        body = json.loads(body)
    return status, body, head


def _upload(server, filename, data):
    body, content_type = _multipart(filename, data)
    return _call(server.url + "api/classify", body, {"Content-Type": content_type})


# --- pieces -----------------------------------------------------------------------------------


def test_multipart_keeps_binary_bytes_exact(tmp_path):
    data = _png() + b"\r\n--not-a-boundary\r\n\r\n" + bytes(range(256))
    body, content_type = _multipart("M 42.png", data)
    assert receive(Body(io.BytesIO(body), len(body)), content_type, tmp_path / "u") == "M 42.png"
    assert (tmp_path / "u").read_bytes() == data


# --- the JSON API on a real server -----------------------------------------------------------


def test_page_and_static_files_are_served_with_a_strict_policy(server):
    status, body, head = _call(server.url)
    assert status == 200 and b'id="upload-form"' in body
    assert "default-src 'self'" in head["Content-Security-Policy"] and head["X-Content-Type-Options"] == "nosniff"
    assert _call(server.url + "static/app.js")[0] == 200 and _call(server.url + "static/style.css")[0] == 200
    status, body, _ = _call(server.url + "static/../device/web.py")
    assert status == 404 and "error" in body


def test_upload_a_good_image_returns_top_k(server):
    status, result, _ = _upload(server, "M42.png", _png("emission"))
    assert status == 200, result
    assert result["file"] == "M42.png" and result["label"] == "emission" and result["type"] == "PNG"
    scores = [score for _, score in result["top_k"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert {label for label, _ in result["top_k"]} == {"emission", "reflection", "other"}
    # The raw body works too, named by a header.
    status, result, _ = _call(server.url + "api/classify", _png("reflection", seed=4), {"X-Filename": "M78.png", "Content-Type": "image/png"})
    assert status == 200 and result["file"] == "M78.png" and result["label"] == "reflection"


def test_bad_uploads_get_a_clear_4xx_and_the_server_goes_on(server):
    status, result, _ = _upload(server, "notes.png", b"just some text, not a picture")
    assert status == 415 and result["error"] == "notes.png: not a JPEG, PNG, TIFF or FITS image (checked by content)"
    status, result, _ = _upload(server, "cut.png", _png()[:300])
    assert status == 422 and result["error"].startswith("cut.png: truncated or corrupt image")
    status, result, _ = _upload(server, "empty.png", b"")
    assert status == 400 and "empty upload" in result["error"]
    body, content_type = _multipart("x.png", _png(), field="other")
    status, result, _ = _call(server.url + "api/classify", body[: body.index(b"--", 10)], {"Content-Type": content_type})
    assert status == 400 and "no file in the upload" in result["error"]
    assert _call(server.url + "api/nothing", b"x")[0] == 404
    # Still answering.
    assert _upload(server, "M42.png", _png())[0] == 200


def test_too_large_is_413_and_the_server_goes_on(server):
    too_large = b"\x89PNG\r\n\x1a\n" + bytes(25 * 1024 * 1024)
    status, result, _ = _upload(server, "huge.png", too_large)
    assert status == 413 and result["error"].startswith("upload too large: 25.0 MB, the limit is 25 MB")
    assert _call(server.url + "api/latest")[0] == 200
    assert _upload(server, "M42.png", _png())[0] == 200


def test_uploads_are_written_only_to_a_private_temporary_folder_and_deleted(server, monkeypatch, tmp_path):
    import nebula.device.classify as classify  # the web page decodes through classify_file, as the CLI does

    seen = []
    real_load_image = classify.load_image

    def watching_load_image(path, spec=None):  # the real decoder, noting where it was asked to read
        seen.append((Path(path), stat.S_IMODE(os.stat(Path(path).parent).st_mode)))
        return real_load_image(path, spec)

    monkeypatch.setattr(classify, "load_image", watching_load_image)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    status, result, _ = _upload(server, "../../../etc/cron.d/evil.png", _png())
    assert status == 200 and result["file"] == "evil.png"
    ((path, mode),) = seen
    assert path.parent.parent == tmp_path and path.name == "upload.png" and mode == 0o700
    assert list(tmp_path.iterdir()) == []  # deleted after


def test_latest_frame_and_history(server):
    status, latest, _ = _call(server.url + "api/latest")
    assert status == 200 and latest["latest"] is None and latest["image"] is None and latest["model"]["labels"] == ["emission", "reflection", "other"]
    assert _call(server.url + "latest.jpg")[0] == 404
    state = server.httpd.app.state
    state.update({"frame": 1, "label": "reflection", "score": 0.8, "utc": "t1"}, Frame(id="1", rgb=sky_image("reflection")))
    state.update({"frame": 2, "label": "emission", "score": 0.9, "utc": "t2"}, Frame(id="2", rgb=sky_image("emission"), preview=np.zeros((900, 1200, 3), np.uint8)))
    status, latest, _ = _call(server.url + "api/latest")
    assert latest["latest"]["label"] == "emission" and [h["frame"] for h in latest["history"]] == [2, 1]
    status, jpeg, head = _call(server.url + latest["image"].lstrip("/"))
    assert status == 200 and head["Content-Type"] == "image/jpeg" and jpeg[:3] == b"\xff\xd8\xff"
    assert Image.open(io.BytesIO(jpeg)).size == (800, 600)  # the preview, downscaled
    state.update({"frame": 3, "error": "cannot classify (bad buffer)", "utc": "t3"}, Frame(id="3", rgb=np.zeros((4, 4), np.uint8)))
    latest = _call(server.url + "api/latest")[1]
    assert latest["latest"]["error"] and latest["history"][0]["frame"] == 3
    assert Image.open(io.BytesIO(_call(server.url + latest["image"].lstrip("/"))[1])).size == (800, 600)  # still the last good picture


def test_a_port_in_use_is_one_clear_error(classifier, server):
    port = server.httpd.server_address[1]
    with pytest.raises(WebServerError, match=f"cannot serve the web page on 127.0.0.1:{port}"):
        start_server(classifier, "127.0.0.1", port)


def test_run_with_web_serves_the_live_frames(tiny_model_file, tmp_path):
    lines = []
    config = RunConfig(source="fake", model=str(tiny_model_file), log=str(tmp_path / "r.jsonl"), web=True, port=0, max_fps=20, max_frames=60)
    from nebula.device.daemon import run

    release = threading.Event()

    def hold_at_frame_4(record, frame):  # the page lives while frames come: hold them so a slow test still finds it
        if record.get("frame") == 4:
            release.wait(30)

    thread = threading.Thread(target=run, args=(config,), kwargs={"announce": lines.append, "on_result": hold_at_frame_4})
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(line.startswith("web page:") for line in lines):
            time.sleep(0.05)
        url = next(line for line in lines if line.startswith("web page:")).split()[-1]
        assert url.startswith("http://127.0.0.1:")
        latest = {"count": 0}
        while time.monotonic() < deadline and latest["count"] < 3:
            latest = _call(url + "api/latest")[1]
            time.sleep(0.05)
        assert latest["latest"]["frame"] >= 3 and latest["latest"]["label"] in ("emission", "reflection", "other", "unknown")
        assert _call(url + latest["image"].lstrip("/"))[0] == 200
    finally:
        release.set()
        thread.join(30)
    assert not thread.is_alive()


def test_nebula_serve_starts_answers_and_stops_on_sigterm(tiny_model_file):
    process = subprocess.Popen([sys.executable, "-m", "nebula", "serve", "--port", "0", "--model", str(tiny_model_file)],
                               cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line.startswith("web page:"):
                url = line.split()[-1]
        assert url and url.startswith("http://127.0.0.1:")
        assert _call(url + "api/latest")[0] == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


# --- a real browser ----------------------------------------------------------------------------

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium") if p and os.path.exists(p)), None)


class _WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol: text frames, client-masked, no extensions."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            head += chunk
        head, self.buffer = head.split(b"\r\n\r\n", 1)
        assert head.split(b"\r\n")[0].split()[1] == b"101", head

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def send(self, text: str) -> None:
        payload = text.encode()
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536
                                  else bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        masked = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
        self.sock.sendall(header + mask + masked)

    def recv(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = first & 0x0F
            if opcode == 8:
                raise ConnectionError("DevTools closed the WebSocket")
            if opcode in (0, 1, 2):
                message += payload
                if first & 0x80:
                    return message.decode()


class _DevTools:
    def __init__(self, ws_url: str):
        self.ws, self.next_id = _WebSocket(ws_url), 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt install chromium); the browser test needs it")
    profile = tmp_path / "chromium-profile"
    process = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()) and time.monotonic() < deadline:
            assert process.poll() is None, "chromium exited at start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        # DevTools listens before the first tab exists: on a busy machine /json/list can still be empty.
        while True:
            assert process.poll() is None, "chromium exited at start"
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            pages = [t for t in targets if t["type"] == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert pages, "chromium opened no page within 30 s"
        yield _DevTools(pages[0]["webSocketDebuggerUrl"])
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_RESULT = """JSON.stringify({
  hidden: document.getElementById('upload-result').hidden,
  file: document.getElementById('result-file').textContent,
  label: document.getElementById('result-label').textContent,
  bars: [...document.querySelectorAll('#result-bars .row')].map(r => [r.querySelector('.name').textContent,
         r.querySelector('.pct').textContent, parseFloat(r.querySelector('.fill').style.width)]),
  injected: document.querySelectorAll('#upload-result b, #upload-result img').length,
  error: document.getElementById('upload-error').hidden ? null : document.getElementById('upload-error').textContent,
})"""


def test_browser_uploads_through_the_form_and_reads_the_result(browser, server, tmp_path):
    server.httpd.app.state.update({"frame": 41, "label": "emission", "score": 0.93, "utc": "2024-11-02T01:02:03Z"},
                                  Frame(id="41", rgb=sky_image("emission")))
    browser.call("Page.enable")
    browser.call("Page.navigate", url=server.url)
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('upload-form')")
    # The live panel fills itself from /api/latest.
    assert browser.wait_for("document.getElementById('live-label').textContent === 'emission' && document.getElementById('live-score').textContent")
    assert browser.evaluate("document.querySelectorAll('#history li').length") == 1
    assert browser.wait_for("document.getElementById('live-image').complete && document.getElementById('live-image').naturalWidth") == 64

    def upload(path: Path) -> dict:
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=root, selector="#upload-file")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])
        browser.evaluate("document.getElementById('upload-result').hidden = true; document.getElementById('upload-submit').click()")
        browser.wait_for(f"(r => !r.hidden || r.error !== null)(JSON.parse({_RESULT}))")
        return json.loads(browser.evaluate(_RESULT))

    good = tmp_path / "<b>M42<img src=x>.png"  # a hostile name: must be shown as text, never parsed as HTML
    good.write_bytes(_png("emission", seed=7))
    result = upload(good)
    assert result["error"] is None and not result["hidden"]
    assert result["file"] == "<b>M42<img src=x>.png" and result["injected"] == 0
    assert result["label"] == "emission"
    names = [name for name, _, _ in result["bars"]]
    widths = [width for _, _, width in result["bars"]]
    assert sorted(names) == ["emission", "other", "reflection"] and names[0] == "emission"
    assert widths == sorted(widths, reverse=True) and widths[0] > 50 and result["bars"][0][1].endswith("%")

    bad = tmp_path / "notes.png"
    bad.write_text("a text file with an image's name")
    result = upload(bad)
    assert result["hidden"] and result["error"] == "notes.png: not a JPEG, PNG, TIFF or FITS image (checked by content)"


# --- bad requests and load: 4xx with a message, bounded memory ----------------------------------


@pytest.fixture
def strict_server(classifier):
    """One upload at a time, and a client silent for a second is dropped."""
    running = start_server(classifier, "127.0.0.1", 0, max_uploads=1, upload_timeout_s=1.0)
    yield running
    running.stop()


def _raw(server, method, path, headers, body=b"", read=True):
    """A request as a client may send it, headers unchecked; (status, JSON answer, headers)."""
    import http.client

    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.putrequest(method, path, skip_accept_encoding=True)
    for key, value in headers.items():
        connection.putheader(key, value)
    connection.endheaders(body or None)
    if not read:
        return connection
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data) if data else None, response.headers


@pytest.mark.parametrize(
    "headers,status,message",
    [
        ({"Content-Length": "-5"}, 400, "Content-Length must be 0 or more, not -5"),
        ({}, 411, "the upload needs a Content-Length header"),
        ({"Content-Length": "twelve"}, 400, "Content-Length is not a number of bytes"),
        ({"Content-Length": str(10**12)}, 413, "upload too large"),
    ],
)
def test_bad_content_lengths_are_4xx_with_a_message(strict_server, headers, status, message):
    got, answer, _ = _raw(strict_server, "POST", "/api/classify", headers)
    assert got == status and message in answer["error"]
    assert _upload(strict_server, "M42.png", _png())[0] == 200  # and the server goes on


def test_a_body_shorter_than_its_content_length_times_out_with_408(strict_server):
    t0 = time.monotonic()
    got, answer, _ = _raw(strict_server, "POST", "/api/classify", {"Content-Length": "5000", "Content-Type": "image/png"}, _png()[:100])
    assert got == 408 and answer["error"] == "upload stalled: no data for 1 s after 100 of 5000 bytes"
    assert time.monotonic() - t0 < 20  # the configured second, not http.server's old minute
    assert _upload(strict_server, "M42.png", _png())[0] == 200


def test_other_methods_get_405_in_json(server):
    got, answer, head = _raw(server, "PUT", "/api/classify", {"Content-Length": "3"}, b"abc")
    assert got == 405 and head["Allow"] == "POST" and "PUT is not allowed" in answer["error"]
    got, answer, head = _raw(server, "GET", "/api/classify", {})
    assert got == 405 and head["Allow"] == "POST"
    got, answer, head = _raw(server, "DELETE", "/", {})
    assert got == 405 and head["Allow"] == "GET, HEAD"
    got, answer, head = _raw(server, "BREW", "/", {})
    assert got == 501 and head["Content-Type"] == "application/json" and answer["error"]
    got, _, head = _raw(server, "HEAD", "/", {})
    assert got == 200 and head["Content-Type"].startswith("text/html")


def test_uploads_beyond_the_slots_get_503_with_retry_after(classifier):
    server = start_server(classifier, "127.0.0.1", 0, max_uploads=1, upload_timeout_s=3.0)

    def stall():  # holds the only slot until its 3 s of silence run out
        return _raw(server, "POST", "/api/classify", {"Content-Length": "5000", "Content-Type": "image/png"},
                    _png()[:100], read=False)

    try:
        stalled = stall()
        deadline = time.monotonic() + 60  # bounds a broken server only
        while True:  # until the stalled upload holds the slot when a probe comes
            got, answer, head = _upload(server, "M42.png", _png())
            if got == 503 or time.monotonic() > deadline:
                break
            # The probe had the slot: on a busy machine it can reach the server first, and the stalled upload
            # is then refused (or times out). Once the server has answered it, stall again.
            if select.select([stalled.sock], [], [], 0)[0]:
                stalled.close()
                stalled = stall()
            time.sleep(0.05)
        assert got == 503 and head["Retry-After"] == "5" and answer["error"] == "busy: 1 upload already in progress (the limit); try again in 5 s"
        assert stalled.getresponse().status == 408
        stalled.close()
        assert _upload(server, "M42.png", _png())[0] == 200
    finally:
        server.stop()


def test_uploads_are_decoded_under_the_same_pixel_limit(server):
    from astropy.io import fits as astrofits

    header = astrofits.Header([("SIMPLE", True), ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 30000), ("NAXIS2", 30000)])
    got, answer, _ = _upload(server, "huge.fits", header.tostring().encode("ascii"))
    assert got == 422 and "declares 30000x30000 pixels (900.0 MP), over the limit" in answer["error"]
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    got, answer, _ = _upload(server, "bomb.png", bomb)
    assert got == 422 and "decompression bomb" in answer["error"]


def _rss_kb(pid: int, field: str) -> int:
    """VmRSS or VmHWM (the peak since the last reset) of a process, in kB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_concurrent_8mb_uploads_keep_the_servers_memory_bounded(tiny_model_file):
    """12 clients upload an 8 MB PNG at once against `nebula serve`, retrying on 503 until classified.

    The bound: at most `max_uploads` (2) uploads are decoded at once, and a body is streamed to disk
    in 64 KB chunks. Decoding this 1672x1672 RGB PNG holds PIL's image (4 bytes a pixel) and its
    RGB array (3): 7 x 2.8 MP = 19.6 MB, so two at once are 39 MB, plus chunk buffers and thread
    stacks (under 2 MB for 12 threads). Holding the bodies alone would be 12 x 8.4 = 101 MB.
    """
    import queue
    import signal

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1672, 1672, 3), dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    photo = buffer.getvalue()
    assert 8e6 < len(photo) < 9e6
    process = subprocess.Popen([sys.executable, "-m", "nebula", "serve", "--port", "0", "--model", str(tiny_model_file)],
                               cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        url, deadline = None, time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            url = line.split()[-1] if line.startswith("web page:") else None
        body, content_type = _multipart("noise.png", photo)
        assert _call(url + "api/classify", body, {"Content-Type": content_type})[0] == 200  # warm: imports, allocator
        baseline = _rss_kb(process.pid, "VmRSS")
        Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
        answers = []

        def client():
            while time.monotonic() < deadline + 120:
                status, result, head = _call(url + "api/classify", body, {"Content-Type": content_type})
                answers.append((status, head.get("Retry-After")))
                if status != 503:
                    return
                time.sleep(0.2)

        clients = [threading.Thread(target=client) for _ in range(12)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        growth_mb = (_rss_kb(process.pid, "VmHWM") - baseline) / 1024
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert sorted(set(answers)) == [(200, None), (503, "5")], answers  # every client got through; the excess waited
    assert sum(status == 200 for status, _ in answers) == 12
    print(f"peak RSS growth under 12 concurrent 8 MB uploads: {growth_mb:.1f} MB")
    assert growth_mb < 50, f"{growth_mb:.1f} MB"
