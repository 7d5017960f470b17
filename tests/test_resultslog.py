"""The results log: durable lines, rotation that never splits one, and the watched folder's memory across rotations."""

import errno
import json
import os

import pytest

from nebula.device import resultslog
from nebula.device.resultslog import ResultsLog, log_files, processed_files


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _capture(folder, name, size):
    path = folder / name
    path.write_bytes(b"x" * size)
    stat = path.stat()
    return {"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "label": "emission", "note": "n" * (size % 50)}


def test_rotation_never_splits_a_line_and_keeps_every_line_in_order(tmp_path):
    log = ResultsLog(tmp_path / "results.jsonl", fsync_s=0, max_bytes=1000, keep=50)
    records = [{"frame": i, "label": "other", "pad": "p" * (i * 7 % 90)} for i in range(200)]
    for record in records:
        log.write(record)
    log.close()
    files = log_files(tmp_path / "results.jsonl")
    assert len(files) > 10
    for path in files:
        assert path.stat().st_size <= 1000 and path.read_bytes().endswith(b"\n")
    assert [line for path in files for line in _lines(path)] == records


def test_rotation_keeps_at_most_keep_files(tmp_path):
    log = ResultsLog(tmp_path / "r.jsonl", fsync_s=0, max_bytes=300, keep=2)
    for i in range(100):
        log.write({"frame": i, "pad": "p" * 40})
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "r.jsonl.1", "r.jsonl.2"]
    assert _lines(tmp_path / "r.jsonl")[-1]["frame"] == 99


def test_captures_are_remembered_across_rotations_while_they_exist(tmp_path):
    captures = tmp_path / "captures"
    captures.mkdir()
    log = ResultsLog(tmp_path / "r.jsonl", fsync_s=0, max_bytes=400, keep=1)
    records = [_capture(captures, f"M{i}.fits", 100 + i) for i in range(30)]
    for record in records:
        log.write(record)
    log.close()
    # Most lines are gone with the rotated files that were dropped, but every capture is still known.
    assert sum(len(_lines(p)) for p in (tmp_path / "r.jsonl", tmp_path / "r.jsonl.1")) < 30
    expected = {(r["file"], r["size"], r["mtime_ns"]) for r in records}
    assert processed_files(tmp_path / "r.jsonl") == expected
    # A capture deleted from the folder is not carried on: the memory is no larger than the folder.
    os.unlink(records[0]["file"])
    log = ResultsLog(tmp_path / "r.jsonl", fsync_s=0, max_bytes=400, keep=1)
    for i in range(10):
        log.write({"frame": i, "pad": "p" * 100})
    log.close()
    assert processed_files(tmp_path / "r.jsonl") == expected - {(records[0]["file"], records[0]["size"], records[0]["mtime_ns"])}


def test_every_line_is_fsynced_when_asked(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(resultslog.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log = ResultsLog(tmp_path / "r.jsonl", fsync_s=0)
    for i in range(5):
        log.write({"frame": i})
    assert len(synced) == 5
    log.close()


class _RecordedTimer:
    """threading.Timer as the log uses it, fired by the test: a real 0.2 s timer races a busy machine's scheduler."""

    made = []

    def __init__(self, interval, function):
        self.interval, self.function, self.daemon, self.started, self.cancelled = interval, function, False, False, False
        _RecordedTimer.made.append(self)

    def start(self):
        self.started = True

    def cancel(self):
        self.cancelled = True


def test_lines_are_fsynced_within_fsync_s_even_if_no_line_follows(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(resultslog.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    monkeypatch.setattr(resultslog.threading, "Timer", _RecordedTimer)
    _RecordedTimer.made.clear()
    log = ResultsLog(tmp_path / "r.jsonl", fsync_s=0.2)
    for i in range(10):
        log.write({"frame": i})
    assert synced == []  # batched...
    [timer] = _RecordedTimer.made  # ...behind one timer, armed by the first line, that outlives no process
    assert timer.interval == 0.2 and timer.started and timer.daemon and not timer.cancelled
    timer.function()  # what the timer's thread does 0.2 s later
    assert synced == [log._fd]  # one fsync for the ten lines, without an eleventh write
    log.write({"frame": 10})
    assert len(_RecordedTimer.made) == 2 and _RecordedTimer.made[1].started  # the next line arms a new timer
    log.close()
    assert len(synced) == 2 and _RecordedTimer.made[1].cancelled  # closing syncs what the second timer had not, and stops it


def test_a_line_cut_by_a_power_cut_does_not_spoil_the_next(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"file": "/a.png", "size": 1, "mtime_ns": 2}\n{"file": "/b.png", "si')
    log = ResultsLog(path, fsync_s=0)
    log.write({"file": "/c.png", "size": 3, "mtime_ns": 4})
    log.close()
    assert processed_files(path) == {("/a.png", 1, 2), ("/c.png", 3, 4)}


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="keep at least 1"):
        ResultsLog(tmp_path / "r.jsonl", keep=0)


class _FullDisk:
    """os.write for the files under `folder` as on a full disk: when `full`, the first write of a line gets part
    of it through (as a real ENOSPC does), every write after that raises ENOSPC; other descriptors are untouched."""

    def __init__(self, monkeypatch, folder):
        self.folder, self.full, self._real, self._cut = str(folder), False, os.write, False
        monkeypatch.setattr(resultslog.os, "write", self.write)

    def write(self, fd, data):
        if not self.full or not os.readlink(f"/proc/self/fd/{fd}").startswith(self.folder):
            return self._real(fd, data)
        if not self._cut and len(data) > 4:
            self._cut = True
            return self._real(fd, bytes(data[:4]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def set_full(self, full):
        self.full, self._cut = full, False


def test_a_full_disk_keeps_the_lines_in_memory_and_writes_them_once_there_is_room(tmp_path, monkeypatch):
    disk, said = _FullDisk(monkeypatch, tmp_path), []
    path = tmp_path / "r.jsonl"
    log = ResultsLog(path, fsync_s=0, echo=said.append)
    log.write({"frame": 0})
    disk.set_full(True)
    for i in range(1, 4):
        log.write({"frame": i})  # does not raise
    assert len(said) == 1 and str(path) in said[0] and "No space left on device" in said[0] and "in memory" in said[0], said
    assert path.read_text() == '{"frame": 0}\n'  # the cut line was taken back
    disk.set_full(False)
    log.write({"frame": 4})
    assert len(said) == 2 and str(path) in said[1] and "3 lines" in said[1], said
    log.close()
    assert _lines(path) == [{"frame": i} for i in range(5)]


def test_the_memory_buffer_is_bounded_and_says_what_it_dropped(tmp_path, monkeypatch):
    disk, said = _FullDisk(monkeypatch, tmp_path), []
    log = ResultsLog(tmp_path / "r.jsonl", fsync_s=0, echo=said.append, max_pending=3)
    disk.set_full(True)
    for i in range(10):
        log.write({"frame": i})
    disk.set_full(False)
    log.write({"frame": 10})
    log.close()
    assert _lines(tmp_path / "r.jsonl") == [{"frame": i} for i in (7, 8, 9, 10)]
    assert "3 lines held in memory, the most it keeps" in said[1] and "the 7 oldest had to be dropped" in said[-1], said


def test_lines_still_unwritten_at_close_are_said_lost_and_close_does_not_raise(tmp_path, monkeypatch):
    disk, said = _FullDisk(monkeypatch, tmp_path), []
    log = ResultsLog(tmp_path / "r.jsonl", fsync_s=0.05, echo=said.append)
    disk.set_full(True)
    log.write({"frame": 1})
    log.write({"frame": 2})
    log.close()
    assert "2 lines" in said[-1] and "lost" in said[-1] and str(tmp_path / "r.jsonl") in said[-1], said
