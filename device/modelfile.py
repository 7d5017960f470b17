"""The self-describing model file: a TFLite flatbuffer with its labels and manifest appended.

The extras are a zip archive appended to the flatbuffer, exactly where TFLite
Metadata keeps its associated files, so Python's standard library alone reads
them back, and MediaPipe or the TFLite Support library find the same labels.txt:

    model.tflite = <TFLite flatbuffer, with a TFLITE_METADATA entry> + zip{labels.txt, manifest.json}

The TFLITE_METADATA entry (written by nebula.convert.tflite_metadata) is for other
runtimes; this reader needs only the zip, so files from before it read the same.
The manifest's ``sha256`` is the hash of the flatbuffer part, metadata entry
included, so a truncated or modified file is caught before the interpreter sees
it. The hash cannot cover the manifest that holds it; the labels are in the
manifest too, and the two copies must agree.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from nebula.device.preprocess import PreprocessSpec

try:  # CPython's own SHA-256: hashlib would load OpenSSL's libcrypto (3.6 MB resident) for this one hash
    from _sha256 import sha256 as _sha256  # Python <= 3.11
except ImportError:
    try:
        from _sha2 import sha256 as _sha256  # Python >= 3.12
    except ImportError:
        from hashlib import sha256 as _sha256

FORMAT = "nebula-classifier/1"
LABELS_NAME = "labels.txt"
MANIFEST_NAME = "manifest.json"


class ModelFileError(Exception):
    """A model file that cannot be used; the message is one line naming the file and the cause."""


@dataclass
class ModelFile:
    path: Path | None
    data: bytes  # the whole file; TFLite reads the flatbuffer at its start and ignores the zip after it
    flatbuffer_size: int
    labels: list[str]
    manifest: dict

    @property
    def flatbuffer(self) -> bytes:
        """The TFLite part alone (a copy: the device loads `data` as it is, to hold the model once)."""
        return self.data[: self.flatbuffer_size]

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.manifest["preprocess"])


def flatbuffer_sha256(flatbuffer: bytes | memoryview) -> str:
    return _sha256(flatbuffer).hexdigest()


def embed(flatbuffer: bytes, labels: list[str], manifest: dict) -> bytes:
    """Return flatbuffer + zip(labels, manifest); the manifest gains `format`, `labels`, `sha256`."""
    if flatbuffer[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (no TFL3 identifier)")
    manifest = {**manifest, "format": FORMAT, "labels": list(labels), "sha256": flatbuffer_sha256(flatbuffer)}
    model = io.BytesIO(flatbuffer)
    # Appending to the flatbuffer (not concatenating a separate zip) makes the zip's
    # offsets count from the file's start, as TFLite's metadata populator writes them;
    # stored, not deflated: MediaPipe refuses a compressed archive.
    with zipfile.ZipFile(model, "a", zipfile.ZIP_STORED) as zf:
        zf.writestr(LABELS_NAME, "".join(f"{label}\n" for label in labels))
        zf.writestr(MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True))
    data = model.getvalue()
    if not data.startswith(flatbuffer):  # zipfile took stray bytes in the weights for an archive of its own
        raise ValueError("appending the archive changed the flatbuffer")
    return data


def parse(data: bytes, path: Path | None = None) -> ModelFile:
    """Split a model file's bytes into flatbuffer, labels and manifest, checking each."""
    name = str(path) if path else "<model bytes>"
    if len(data) < 8:
        raise ModelFileError(f"{name}: not a model file ({len(data)} bytes)")
    if data[4:8] != b"TFL3":
        raise ModelFileError(f"{name}: not a TFLite model (no TFL3 identifier at byte 4)")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ModelFileError(
            f"{name}: no embedded manifest (a bare or truncated .tflite); convert it with 'nebula convert'"
        ) from None
    with zf:
        infos = zf.infolist()
        try:
            labels_text = zf.read(LABELS_NAME).decode("utf-8")
            manifest = json.loads(zf.read(MANIFEST_NAME))
        except KeyError as err:
            raise ModelFileError(f"{name}: embedded archive lacks {err.args[0]}") from None
        except (zipfile.BadZipFile, ValueError, OSError) as err:
            raise ModelFileError(f"{name}: corrupt embedded manifest ({err})") from None
    flatbuffer_size = min(info.header_offset for info in infos)
    labels = [line for line in labels_text.splitlines() if line]
    if manifest.get("format") != FORMAT:
        raise ModelFileError(f"{name}: unknown model format {manifest.get('format')!r}, expected {FORMAT!r}")
    if labels != manifest.get("labels"):
        raise ModelFileError(f"{name}: labels.txt and manifest.json disagree on the labels")
    if flatbuffer_sha256(memoryview(data)[:flatbuffer_size]) != manifest.get("sha256"):
        raise ModelFileError(f"{name}: sha256 mismatch: the model is truncated or was modified after conversion")
    for key in ("preprocess", "input", "output"):
        if key not in manifest:
            raise ModelFileError(f"{name}: manifest lacks '{key}'")
    return ModelFile(path=path, data=data, flatbuffer_size=flatbuffer_size, labels=labels, manifest=manifest)


def read(path: str | Path) -> ModelFile:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except OSError as err:
        raise ModelFileError(f"{path}: cannot read model ({err.strerror or err})") from None
    return parse(data, path)
