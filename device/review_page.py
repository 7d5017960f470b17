"""The review view of the web page: the queue of uncertain items, each filed under a label with one click.

Routes (`nebula.device.web` hands every path under ``/review`` and ``/api/review`` to `get` and `post`):

- ``GET /review``: the page (``templates/review.html``, ``static/review.js``); keys 1-7 pick a
  label, ``s`` skips, ``n`` says "not a deep-sky frame".
- ``GET /api/review``: ``{"enabled", "labels", "labeller", "items": [...]}``; each item has
  ``id``, ``image`` (its URL), ``reason``, ``queued_utc``, ``source``, ``skipped``, the model's
  ``top3`` and, where the result had one, the ``catalog`` label and ``agrees``.
- ``GET /review/image/<id>``: the queued picture; JPEG and PNG as stored, TIFF and FITS drawn as a JPEG.
- ``POST /api/review/<id>`` with JSON ``{"action": "label", "label": L, "by": NAME}``,
  ``{"action": "not_deep_sky", "by": NAME}`` or ``{"action": "skip"}``: answers
  ``{"filed": "labelled/<label>/<file>"}`` or ``{"skipped": id}``; 404 for an item that is no
  longer queued, 400 for a bad request.
"""

from __future__ import annotations

import io
import json
from http import HTTPStatus

from nebula.device import formats
from nebula.device.review import NotQueued, ReviewError, catalog_label, default_labeller

PREFIXES = ("/review", "/api/review")
MAX_BODY = 4096  # a filing is a few short strings
STATIC = {
    "/review": ("templates/review.html", "text/html; charset=utf-8"),
    "/static/review.js": ("static/review.js", "text/javascript; charset=utf-8"),
}
_BROWSER_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png"}
_PREVIEW_MAX_SIDE = 1200

Reply = tuple[int, bytes, str]


def _json(status: int, payload: dict) -> Reply:
    return status, json.dumps(payload).encode("utf-8"), "application/json"


def _no_queue() -> Reply:
    return _json(HTTPStatus.NOT_FOUND, {"error": "the review queue is off (review.enabled in the config; nebula run keeps it)"})


def item_summary(item) -> dict:
    result = item.record["result"]
    summary = {
        "id": item.id, "image": f"/review/image/{item.id}", "reason": item.record.get("reason"),
        "queued_utc": item.record.get("queued_utc"), "skipped": bool(item.record.get("skipped")),
        "source": result["file"].rsplit("/", 1)[-1] if "file" in result else f"frame {result.get('frame')}",
        "top3": (result.get("top_k") or [])[:3], "label": result.get("label"),
    }
    if catalog_label(result) is not None:
        summary["catalog"] = catalog_label(result)
    if "agrees" in result:
        summary["agrees"] = result["agrees"]
    return summary


def get(queue, labels: list[str], path: str) -> Reply:
    """A GET under /api/review or /review/image/ (the page itself is served as a static file)."""
    if path == "/api/review":
        items = [item_summary(item) for item in queue.items()] if queue is not None else []
        return _json(HTTPStatus.OK, {"enabled": queue is not None, "labels": labels, "labeller": default_labeller(), "items": items})
    if path.startswith("/review/image/"):
        if queue is None:
            return _no_queue()
        try:
            item = queue.get(path.rsplit("/", 1)[-1])
        except ReviewError as err:
            return _json(HTTPStatus.NOT_FOUND, {"error": str(err)})
        return _picture(item.image)
    return _json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})


def post(queue, labels: list[str], path: str, headers, body_file) -> Reply:
    """File, skip or reject one queued item (the request's headers and body stream, from http.server)."""
    if queue is None:
        return _no_queue()
    # Only JSON: a page elsewhere cannot send that without a preflight, which this server never grants.
    if headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
        return _json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send the request as application/json"})
    try:
        length = int(headers.get("Content-Length", ""))
    except ValueError:
        return _json(HTTPStatus.LENGTH_REQUIRED, {"error": "the request needs a Content-Length header"})
    if not 0 <= length <= MAX_BODY:
        return _json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"a review request is a JSON object of at most {MAX_BODY} bytes"})
    item_id = path[len("/api/review/"):]
    try:
        request = json.loads(body_file.read(length) or b"{}")
        if not isinstance(request, dict):
            raise ValueError
    except ValueError:
        return _json(HTTPStatus.BAD_REQUEST, {"error": "send a JSON object: {\"action\": \"label\", \"label\": ..., \"by\": ...}"})
    action, by = request.get("action"), str(request.get("by") or "")[:100]
    try:
        if action == "label":
            target = queue.file(item_id, str(request.get("label")), by=by, labels=labels)
        elif action == "not_deep_sky":
            target = queue.file(item_id, None, by=by, labels=labels)
        elif action == "skip":
            queue.skip(item_id)
            return _json(HTTPStatus.OK, {"skipped": item_id})
        else:
            return _json(HTTPStatus.BAD_REQUEST, {"error": f"action must be label, not_deep_sky or skip, not {action!r}"})
    except ReviewError as err:
        return _json(HTTPStatus.NOT_FOUND if isinstance(err, NotQueued) else HTTPStatus.BAD_REQUEST, {"error": str(err)})
    return _json(HTTPStatus.OK, {"filed": target.relative_to(queue.root).as_posix()})


def _picture(path) -> Reply:
    kind = formats.by_name(path.name)
    if kind is not None and kind.name in _BROWSER_TYPES:
        return HTTPStatus.OK, path.read_bytes(), _BROWSER_TYPES[kind.name]
    from PIL import Image

    from nebula.device.decode import ImageError, load_image

    try:
        rgb = load_image(path)
    except ImageError as err:
        return _json(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": f"{path.name}: {err.cause}"})
    picture = Image.fromarray(rgb)
    picture.thumbnail((_PREVIEW_MAX_SIDE, _PREVIEW_MAX_SIDE))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return HTTPStatus.OK, buffer.getvalue(), "image/jpeg"
