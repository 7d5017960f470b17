"""The daemon's results log: append-only JSON lines that survive a power cut and do not fill the SD card.

- **Durable.** Each line goes to the file in one ``write`` on an ``O_APPEND``
  descriptor, so a line is never interleaved or half-replaced. It is then made
  durable with ``fsync``: after every line (``fsync_s = 0``), or at most
  ``fsync_s`` seconds later (a timer syncs what is pending, so a power cut loses
  at most the last ``fsync_s`` seconds of lines, never more, even when no line follows).
  A line cut short by a power cut is ended on the next start, so the next
  line is whole (the cut one is ignored by `processed_files`).
- **Bounded.** When the next line would take the file past ``max_bytes``, the
  file is renamed to ``<log>.1`` (``.1`` to ``.2``, ... up to ``keep`` files) and
  a new one begun: rotation happens between lines, so no line is ever split
  across two files.
- **A full disk does not stop the daemon.** A line that cannot be written (ENOSPC,
  EIO, any OSError) is kept in memory, at most ``max_pending`` lines (`MAX_PENDING`,
  10,000: a few MB; past that the oldest are dropped, and that is said), and
  retried before the next line, in order; a part of a line the disk took is cut
  off again first, so no line is ever glued to another. One stderr line names
  the log and the cause when writing starts failing, one when the held lines are
  written, and `close` says how many could never be written.
- **The watched folder's memory survives rotation.** `processed_files` reads the
  log and every rotated file. Before the oldest rotated file is deleted, the
  capture keys in it whose file still exists unchanged are carried into
  ``<log>.done`` (one ``[file, size, mtime_ns]`` per line, rewritten atomically),
  which `processed_files` reads too: a capture still in the folder is never
  classified twice, and ``<log>.done`` holds no more than the folder does.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Callable

from nebula.device.config import RunConfig

MAX_PENDING = 10_000  # lines held in memory while the disk refuses them; a result line is a few hundred bytes


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class ResultsLog:
    """Append JSON records as lines; see the module docstring for durability and rotation."""

    def __init__(self, path: str | Path, fsync_s: float = RunConfig.log_fsync_s,
                 max_bytes: int = int(RunConfig.log_max_mb * 2**20), keep: int = RunConfig.log_keep,
                 echo: Callable[[str], None] = _to_stderr, max_pending: int = MAX_PENDING):
        if fsync_s < 0 or max_bytes < 0 or keep < 1 or max_pending < 1:
            raise ValueError("fsync_s and max_bytes must be 0 or more, keep at least 1, max_pending at least 1")
        self.path = Path(path)
        self.fsync_s, self.max_bytes, self.keep = fsync_s, max_bytes, keep
        self.echo, self.max_pending = echo, max_pending
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._dirty = False
        self._pending: deque[bytes] = deque()  # lines the disk refused, oldest first
        self._failing: str | None = None  # the cause while writes fail, so it is said once, not per line
        self._dropped = 0
        self._fd = self._open()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(fd).st_size
        if self._size and os.pread(fd, 1, self._size - 1) != b"\n":
            _write_all(fd, b"\n")  # a line cut by a power cut: end it, so the next line starts clean
            self._size += 1
        return fd

    def write(self, record: dict) -> None:
        """Append one record as a line; never raises for the disk (see "A full disk" in the module docstring)."""
        line = (json.dumps(record, separators=(", ", ": ")) + "\n").encode("utf-8")
        with self._lock:
            held = len(self._pending)
            if held:
                try:  # the held lines first, so a full buffer drops one only when the disk still refuses
                    self._write_pending()
                except OSError:
                    pass
            if len(self._pending) >= self.max_pending:
                self._pending.popleft()
                self._dropped += 1
                if self._dropped == 1:
                    self.echo(f"results log {self.path}: {self.max_pending} lines held in memory, the most it keeps; "
                              "dropping the oldest until the disk takes lines again")
            self._pending.append(line)
            try:
                self._write_pending()
            except OSError as err:
                self._say_failing(err)
                return
            if self._failing is not None:
                self._say_recovered(held)
            if self.fsync_s == 0:
                self._fsync_now()
            else:
                self._dirty = True
                if self._timer is None:
                    self._timer = threading.Timer(self.fsync_s, self._sync_pending)
                    self._timer.daemon = True
                    self._timer.start()

    def _write_pending(self) -> None:
        """Write the held lines in order; a line leaves the buffer only once it is whole in the file."""
        if self._fd is None:
            self._fd = self._open()  # a rotation that failed half-way closed it
        if os.fstat(self._fd).st_size > self._size:
            os.ftruncate(self._fd, self._size)  # part of a line a full disk took: cut, so the next line starts clean
        while self._pending:
            line = self._pending[0]
            if self.max_bytes and self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            _write_all(self._fd, line)
            self._size += len(line)
            self._pending.popleft()

    def _say_failing(self, err: OSError) -> None:
        cause = err.strerror or str(err)
        if cause != self._failing:
            self.echo(f"results log {self.path}: cannot write ({cause}); {_lines(len(self._pending))} held in memory "
                      f"(at most {self.max_pending}, then the oldest are dropped), retried before the next line")
        self._failing = cause

    def _say_recovered(self, held: int) -> None:
        dropped = f"; the {self._dropped} oldest had to be dropped" if self._dropped else ""
        self.echo(f"results log {self.path}: writing again; wrote the {_lines(held)} held in memory{dropped}")
        self._failing, self._dropped = None, 0

    def _fsync_now(self) -> None:
        try:
            os.fsync(self._fd)
            self._dirty = False
        except OSError as err:  # the lines are in the page cache; the next sync tries again
            self._dirty = True
            self.echo(f"results log {self.path}: cannot sync to disk ({err.strerror or err}); tried again with the next line")

    def _sync_pending(self) -> None:
        with self._lock:
            self._timer = None
            if self._dirty and self._fd is not None:
                self._fsync_now()

    def rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _rotate(self) -> None:
        os.fsync(self._fd)
        fd, self._fd = self._fd, None  # closed from here: a failure below reopens on the next write
        os.close(fd)
        self._dirty = False
        oldest = self.rotated(self.keep)
        if oldest.exists():
            _carry_existing_keys(oldest, done_path(self.path))
            oldest.unlink()
        for n in range(self.keep - 1, 0, -1):
            if self.rotated(n).exists():
                os.replace(self.rotated(n), self.rotated(n + 1))
        os.replace(self.path, self.rotated(1))
        self._fd = self._open()
        _fsync_folder(self.path.parent)

    def close(self) -> None:
        """Write what is held (one last try), sync and close; what still cannot be written is said lost."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._pending:
                held = len(self._pending)
                try:
                    self._write_pending()
                    self._say_recovered(held)
                except OSError as err:
                    self.echo(f"results log {self.path}: {_lines(len(self._pending))} could not be written "
                              f"({err.strerror or err}) and are lost")
                    self._pending.clear()
            if self._fd is not None:
                self._fsync_now()
                os.close(self._fd)
                self._fd = None


def _lines(n: int) -> str:
    return f"{n} line{'' if n == 1 else 's'}"


def done_path(log: str | Path) -> Path:
    """Where capture keys outlive the rotated file they were logged in."""
    log = Path(log)
    return log.with_name(log.name + ".done")


def log_files(log: str | Path) -> list[Path]:
    """The log's files, oldest first: its carried keys, its rotated files (highest number first), then the log."""
    log = Path(log)
    rotated = sorted(log.parent.glob(log.name + ".[0-9]*"), key=lambda p: -_rotation_number(p))
    return [p for p in (done_path(log), *rotated, log) if p.is_file()]


def _rotation_number(path: Path) -> int:
    suffix = path.name.rsplit(".", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


def processed_files(log: str | Path) -> set[tuple[str, int, int]]:
    """The captures the log (with its rotated files and carried keys) holds a line for, as (file, size, mtime_ns).

    A line cut short by a power cut is not valid JSON and is ignored: that capture
    is classified again, which is the right thing.
    """
    keys = set()
    for path in log_files(log):
        keys.update(_keys_in(path))
    return keys


def _keys_in(path: Path):
    try:
        file = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with file:
        for line in file:
            try:
                record = json.loads(line)
                if isinstance(record, list):  # a carried key
                    name, size, mtime = record
                    yield (str(name), int(size), int(mtime))
                else:
                    yield (record["file"], record["size"], record["mtime_ns"])
            except (ValueError, KeyError, TypeError):
                continue


def _carry_existing_keys(dropped: Path, done: Path) -> None:
    """Rewrite `done` with the keys of `dropped` and of `done` itself whose file still exists unchanged."""
    kept = []
    for key in sorted(set(_keys_in(dropped)) | set(_keys_in(done))):
        name, size, mtime = key
        try:
            stat = os.stat(name)
        except OSError:
            continue
        if (stat.st_size, stat.st_mtime_ns) == (size, mtime):
            kept.append(json.dumps([name, size, mtime]) + "\n")
    if not kept:
        done.unlink(missing_ok=True)
        return
    tmp = done.with_name(done.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        file.writelines(kept)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, done)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_folder(folder: Path) -> None:
    """Make renames in `folder` durable (POSIX); a platform that cannot open folders skips it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
