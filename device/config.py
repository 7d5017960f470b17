"""Configuration of the device commands (classify, run, serve): defaults, then a TOML file, then flags.

Files, later ones winning: ``/etc/nebula-classifier/config.toml``, then
``~/.config/nebula-classifier/config.toml`` (``$XDG_CONFIG_HOME``); or only the one
given with ``--config PATH``. Flags win over both. The resolved configuration is
written next to the results log (``results.config.json`` beside ``results.jsonl``),
so every log says how it was made.

The file (every key optional)::

    source = "watch"            # camera | watch | fake
    model = "/opt/nebula-classifier/nebula.tflite"
    threshold = 0.5             # below this (smoothed) score the answer is "unknown"
    top_k = 3
    tta = 1                     # average this many symmetric views of each image (1-8; each costs one invoke)
    smooth = 5                  # live sources: average the last N frames' probabilities
    max_fps = 5.0               # live sources: at most this many frames a second (0: no limit)
    log = "/var/lib/nebula-classifier/results.jsonl"
    log_fsync_s = 1.0           # fsync the log at most this long after a line (0: after every line)
    log_max_mb = 10.0           # rotate the log at this size (0: never) ...
    log_keep = 5                # ... keeping this many old files (results.jsonl.1 ...)
    sidecar = true              # watch: write <capture>.json beside each capture

    [watch]
    dir = "/home/pi/Pictures/Ekos"
    poll_s = 1.0
    settle_s = 2.0              # a capture is read once unchanged this long
    truncated_grace_s = 30.0    # one that reads as cut short gets this long to be finished

    [camera]
    exposure_us = 2000000       # manual exposure; auto-exposure goes off
    gain = 8.0                  # manual analogue gain
    preview_width = 1280
    preview_height = 960

    [web]
    enabled = true
    host = "127.0.0.1"          # "0.0.0.0" opens the page to the LAN
    port = 8080
    max_uploads = 2             # uploads received and classified at once; more get 503
    upload_timeout_s = 10.0     # a client that sends nothing for this long gets 408

    [review]                    # uncertain items are copied to a review folder, to be labelled on the page
    enabled = true
    dir = "/var/lib/nebula-classifier/review"   # default: review/ beside the results log
    below = 0.6                 # queue when the top score is below this ...
    gap = 0.15                  # ... or the top two are closer than this, or the catalog disagrees
    max_mb = 200.0              # the queue's size limit: the oldest unlabelled items are dropped first
    every_s = 30.0              # live sources: at most one frame queued this often

    [catalog]                   # where a capture points and what the catalogs say is there
    enabled = true              # position from the FITS header, catalog look-up, `agrees`
    file = "/opt/nebula-classifier/models/skycatalog.npz"
    solve = true                # plate-solve captures whose header has no position (astrometry.net)
    solve_cpulimit_s = 30
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Raspberry Pi OS Bullseye's Python 3.9
    import tomli as tomllib

SOURCES = ("camera", "watch", "fake")
SYSTEM_CONFIG = Path("/etc/nebula-classifier/config.toml")
DEFAULT_MODEL = Path("models/nebula.tflite")
DEFAULT_CATALOG = Path("models/skycatalog.npz")  # `nebula catalog build` writes it beside the model


class ConfigError(Exception):
    """A configuration that cannot be used; the message is one line naming the file or flag and the cause."""


def user_config_path(env=os.environ) -> Path:
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "nebula-classifier" / "config.toml"


def default_model_path(env=os.environ) -> Path:
    """The model when none is named: $NEBULA_MODEL, else models/nebula.tflite."""
    return Path(env.get("NEBULA_MODEL") or DEFAULT_MODEL)


def default_catalog_path(env=os.environ) -> Path:
    """The sky catalog when none is named: $NEBULA_CATALOG, else models/skycatalog.npz."""
    return Path(env.get("NEBULA_CATALOG") or DEFAULT_CATALOG)


def default_log_path(env=os.environ) -> str:
    base = Path(env["XDG_STATE_HOME"]) if env.get("XDG_STATE_HOME") else Path.home() / ".local" / "state"
    return str(base / "nebula-classifier" / "results.jsonl")


@dataclass
class RunConfig:
    """The device's settings, and the only home of their defaults.

    Every route reads it: ``nebula classify`` (model, num_threads, threshold, top_k),
    ``nebula serve`` (and web host, port), ``nebula run`` and ``run --web`` (all of it).
    `resolve` fills it from defaults, then the config files, then flags; help texts
    quote the class attributes (``RunConfig.threshold``) for their defaults.
    """

    source: str = "fake"
    watch_dir: str | None = None
    poll_s: float = 1.0
    settle_s: float = 2.0
    truncated_grace_s: float = 30.0
    model: str | None = None  # None: $NEBULA_MODEL or models/nebula.tflite
    num_threads: int | None = None
    threshold: float = 0.5
    top_k: int = 3
    tta: int = 1
    smooth: int = 5
    max_fps: float = 5.0
    max_frames: int | None = None
    log: str = field(default_factory=default_log_path)
    log_fsync_s: float = 1.0
    log_max_mb: float = 10.0
    log_keep: int = 5
    sidecar: bool = False
    exposure_us: int | None = None
    gain: float | None = None
    preview_width: int = 1280
    preview_height: int = 960
    web: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    max_uploads: int = 2
    upload_timeout_s: float = 10.0
    review: bool = True
    review_dir: str | None = None  # None: review/ beside the log (nebula.device.review.review_folder)
    review_below: float = 0.6
    review_gap: float = 0.15
    review_max_mb: float = 200.0
    review_every_s: float = 30.0
    catalog: bool = False  # position, catalog look-up and `agrees` in every file's record
    catalog_file: str | None = None  # None: $NEBULA_CATALOG or models/skycatalog.npz
    solve: bool = False  # plate-solve files without a header position (implies catalog)
    solve_cpulimit_s: int = 30

    def validate(self) -> "RunConfig":
        if self.source not in SOURCES:
            raise ConfigError(f"source must be one of {', '.join(SOURCES)}, not {self.source!r}")
        if self.source == "watch" and not self.watch_dir:
            raise ConfigError("source 'watch' needs a folder: --watch-dir DIR (or [watch] dir in the config file)")
        checks = [
            (0.0 <= self.threshold <= 1.0, "threshold must be between 0 and 1"),
            (self.top_k >= 1, "top_k must be at least 1"),
            (1 <= self.tta <= 8, "tta must be between 1 (off) and 8"),
            (self.smooth >= 1, "smooth must be at least 1 (1: no smoothing)"),
            (self.max_fps >= 0, "max_fps must be 0 (no limit) or more"),
            (self.poll_s > 0, "poll_s must be positive"),
            (self.settle_s >= 0 and self.truncated_grace_s >= 0, "settle_s and truncated_grace_s must be 0 or more"),
            (self.log_fsync_s >= 0, "log_fsync_s must be 0 (every line) or more"),
            (self.log_max_mb >= 0, "log_max_mb must be 0 (never rotate) or more"),
            (self.log_keep >= 1, "log_keep must be at least 1"),
            (self.max_uploads >= 1, "max_uploads must be at least 1"),
            (self.upload_timeout_s > 0, "upload_timeout_s must be positive"),
            (self.max_frames is None or self.max_frames >= 1, "max_frames must be at least 1"),
            (self.exposure_us is None or self.exposure_us > 0, "exposure_us must be positive"),
            (self.gain is None or self.gain > 0, "gain must be positive"),
            (0 <= self.port <= 65535, "port must be between 0 and 65535"),
            (self.preview_width > 0 and self.preview_height > 0, "preview size must be positive"),
            (self.num_threads is None or self.num_threads >= 1, "num_threads must be at least 1"),
            (0 <= self.review_below <= 1 and 0 <= self.review_gap <= 1, "review below and gap must be between 0 and 1"),
            (self.review_max_mb > 0 and self.review_every_s >= 0, "review max_mb must be positive, every_s 0 or more"),
            (self.solve_cpulimit_s >= 1, "solve_cpulimit_s must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# TOML key (dotted for tables) -> RunConfig field.
_TOML_KEYS = {
    "source": "source", "model": "model", "num_threads": "num_threads", "threshold": "threshold", "top_k": "top_k",
    "tta": "tta", "smooth": "smooth", "max_fps": "max_fps", "max_frames": "max_frames", "log": "log", "sidecar": "sidecar",
    "log_fsync_s": "log_fsync_s", "log_max_mb": "log_max_mb", "log_keep": "log_keep",
    "watch.dir": "watch_dir", "watch.poll_s": "poll_s", "watch.settle_s": "settle_s", "watch.truncated_grace_s": "truncated_grace_s",
    "camera.exposure_us": "exposure_us", "camera.gain": "gain",
    "camera.preview_width": "preview_width", "camera.preview_height": "preview_height",
    "web.enabled": "web", "web.host": "host", "web.port": "port",
    "web.max_uploads": "max_uploads", "web.upload_timeout_s": "upload_timeout_s",
    "review.enabled": "review", "review.dir": "review_dir", "review.below": "review_below", "review.gap": "review_gap",
    "review.max_mb": "review_max_mb", "review.every_s": "review_every_s",
    "catalog.enabled": "catalog", "catalog.file": "catalog_file", "catalog.solve": "solve",
    "catalog.solve_cpulimit_s": "solve_cpulimit_s",
}
_TYPES = {
    "source": str, "watch_dir": str, "poll_s": float, "model": str, "num_threads": int, "threshold": float,
    "top_k": int, "tta": int, "smooth": int, "max_fps": float, "max_frames": int, "log": str, "sidecar": bool,
    "exposure_us": int, "gain": float, "preview_width": int, "preview_height": int, "web": bool, "host": str, "port": int,
    "settle_s": float, "truncated_grace_s": float, "log_fsync_s": float, "log_max_mb": float, "log_keep": int,
    "max_uploads": int, "upload_timeout_s": float,
    "review": bool, "review_dir": str, "review_below": float, "review_gap": float, "review_max_mb": float, "review_every_s": float,
    "catalog": bool, "catalog_file": str, "solve": bool, "solve_cpulimit_s": int,
}
assert set(_TYPES) == {f.name for f in fields(RunConfig)}


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _checked(name: str, value, where: str):
    want = _TYPES[name]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {name} must be {want.__name__}, not {type(value).__name__} {value!r}")
    return value


def read_file(path: Path) -> dict:
    """The RunConfig fields a TOML file sets (only those), checked for names and types."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    values = {}
    for key, value in _flatten(data).items():
        if key not in _TOML_KEYS:
            raise ConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(_TOML_KEYS))}")
        name = _TOML_KEYS[key]
        values[name] = _checked(name, value, str(path))
    return values


def config_files(explicit: str | Path | None, env=os.environ) -> list[Path]:
    """The files to read, in order: only `explicit` when given, else those of system and user that exist."""
    if explicit:
        return [Path(explicit).expanduser()]
    return [p for p in (SYSTEM_CONFIG, user_config_path(env)) if p.is_file()]


def resolve(flags: dict, config_path: str | Path | None = None, env=os.environ) -> tuple[RunConfig, list[Path]]:
    """Defaults, then the config files, then the flags that were given (None means not given)."""
    values: dict = {}
    files = config_files(config_path, env)
    for path in files:
        values.update(read_file(path))
    for name, value in flags.items():
        if value is not None:
            values[name] = _checked(name, value, f"--{name.replace('_', '-')}")
    # A watch folder given without a source means: watch it.
    if flags.get("watch_dir") and flags.get("source") is None:
        values["source"] = "watch"
    config = RunConfig(**values)
    config.catalog = config.catalog or config.solve  # a solved position is only worth having to look it up
    for name in ("log", "watch_dir", "model", "review_dir", "catalog_file"):
        if getattr(config, name):
            setattr(config, name, str(Path(getattr(config, name)).expanduser()))
    return config.validate(), files


def resolved_path(log: str | Path) -> Path:
    """Where the resolved configuration of a run goes: ``<log stem>.config.json`` beside the log."""
    log = Path(log)
    return log.with_name(log.stem + ".config.json")


def write_resolved(config: RunConfig, files: list[Path], extra: dict | None = None) -> Path:
    """Write the configuration a run actually used next to its results log."""
    from nebula import __version__

    path = resolved_path(config.log)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "config": config.to_dict(),
        "config_files": [str(p) for p in files],
        "nebula_version": __version__,
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        **(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path
