"""The loop at the telescope: frame source -> classify -> results log (and the web page).

Every item the source yields gets exactly one line in an append-only JSON-lines
log (`nebula.device.resultslog`: written whole, fsynced within ``log_fsync_s``,
rotated by size between lines, held in memory and retried while the disk refuses
it), so a kill loses nothing already classified and a full disk stops nothing. Each line is a
`nebula.device.record.ResultRecord` (its docstring lists the fields), as
``nebula classify --format jsonl`` writes them, with the source's extras; a failed
or skipped item gets its line too, and the loop goes on.

Live sources are smoothed: the label comes from the mean of the last N frames'
probabilities, so it does not flicker between two classes on a noisy sky. A
watched folder's captures are classified one by one, and the log is also the
folder's memory: a restart reads it and skips what it already holds.

SIGTERM and SIGINT finish the current item, log it, and end the loop (exit 0).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from nebula.device.camera import FakeCamera, Frame, FrameSource, PiCamera, WatchFolder
from nebula.device.config import RunConfig, write_resolved
from nebula.device.prefetch import Prefetched
from nebula.device.record import ResultRecord
from nebula.device.resultslog import ResultsLog, processed_files
from nebula.device.runtime import Classifier, Prediction


class Smoother:
    """Mean of the last `n` probability vectors."""

    def __init__(self, n: int):
        self._recent: deque[np.ndarray] = deque(maxlen=max(1, n))

    def add(self, probabilities: np.ndarray) -> np.ndarray:
        self._recent.append(probabilities)
        return np.mean(self._recent, axis=0)

    def __len__(self) -> int:
        return len(self._recent)


class Daemon:
    """Runs one source through one classifier into one log until the source ends or `stop()`.

    Defaults are RunConfig's, except max_fps (no limit here: library use and tests).
    """

    def __init__(
        self,
        classifier: Classifier,
        source: FrameSource,
        log: ResultsLog,
        threshold: float = RunConfig.threshold,
        top_k: int = RunConfig.top_k,
        smooth: int = RunConfig.smooth,
        max_fps: float = 0.0,
        max_frames: int | None = None,
        sidecar: bool = False,
        on_result: Callable[[dict, Frame], None] | None = None,
        lock: threading.Lock | None = None,
        identifier=None,
    ):
        self.classifier, self.source, self.log = classifier, source, log
        self.identifier = identifier  # nebula.device.identify.Identifier: captures' position and catalog answer
        self.threshold, self.top_k, self.max_fps, self.max_frames = threshold, top_k, max_fps, max_frames
        self.sidecar, self.on_result = sidecar, on_result
        self.lock = lock or threading.Lock()  # the interpreter is not thread-safe: shared with the web page
        self.smoother = Smoother(smooth if source.live else 1)
        self.count = self.errors = 0
        self._stopping = False

    def stop(self) -> None:
        """Finish the current item, then end. Safe in a signal handler."""
        self._stopping = True
        self.source.stop()

    def run(self) -> int:
        """Process items until the source ends, `max_frames`, or `stop()`; returns the number logged."""
        # A watched folder's next capture is decoded while the model runs on this one. A live
        # source is not read ahead: the frame classified would be one capture old.
        frames = self.source.frames() if self.source.live else Prefetched(self.source.frames())
        interval = 1.0 / self.max_fps if self.source.live and self.max_fps > 0 else 0.0
        next_at = time.monotonic()
        try:
            for frame in frames:
                record = self.process(frame)
                if self.sidecar and frame.path is not None:
                    record.sidecar_error = _write_sidecar(frame.path, record.to_dict())
                line = record.to_dict()
                self.log.write(line)
                self.count += 1
                self.errors += record.error is not None
                if self.on_result is not None:
                    self.on_result(line, frame)
                if self._stopping or (self.max_frames and self.count >= self.max_frames):
                    break
                if interval:
                    next_at = max(next_at + interval, time.monotonic() - interval)
                    self.source.wait(next_at - time.monotonic())
        finally:
            if isinstance(frames, Prefetched):
                self.source.stop()  # the read-ahead thread may be waiting inside frames() for the next capture
            frames.close()
        return self.count

    def process(self, frame: Frame) -> ResultRecord:
        """One item to one record (never raises for a bad frame: the record says what went wrong)."""
        where = {"file": str(frame.path)} if frame.path is not None else {"frame": int(frame.id) if frame.id.isdigit() else frame.id}
        extras = dict(frame.metadata)
        if frame.error is not None or frame.skipped is not None:
            return ResultRecord(**where, error=frame.error, skipped=frame.skipped, extras=extras)
        try:
            with self.lock:
                single = self.classifier.classify(frame.rgb, top_k=self.top_k, threshold=self.threshold)
        except (ValueError, RuntimeError) as err:
            return ResultRecord(**where, error=f"cannot classify ({_one_line(err)})", extras=extras)
        averaged = self.smoother.add(single.probabilities)
        answer = Prediction.from_probabilities(averaged, self.classifier.labels, self.top_k, self.threshold)
        answer.timings_ms = single.timings_ms  # the model's time is this frame's, whatever the smoothing
        sky = self.identifier.identify(frame.path, answer.label) if self.identifier and frame.path is not None else None
        record = ResultRecord.answer(answer, self.classifier.sha256, **where, extras=extras, **(sky.fields() if sky else {}))
        if self.source.live:
            record.frame_label = single.label
            record.smoothed_over = len(self.smoother)
        return record


def _write_sidecar(capture: Path, record: dict) -> str | None:
    """``<capture>.json`` beside the capture (atomically); a failure is returned for the record, not fatal."""
    target = capture.with_name(capture.name + ".json")
    tmp = capture.with_name(f".{capture.name}.json.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, target)
    except OSError as err:
        return f"{target}: {err.strerror or err}"
    return None


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


@contextmanager
def stop_on_signals(daemon: Daemon) -> Iterator[None]:
    """SIGTERM/SIGINT ask the daemon to finish the current item; a second SIGINT interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        if daemon._stopping and signum == signal.SIGINT:
            raise KeyboardInterrupt
        daemon.stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def make_source(config: RunConfig, log_path: str | Path | None = None) -> FrameSource:
    """The frame source a configuration names (a watched folder remembers what the log holds)."""
    if config.source == "camera":
        return PiCamera(exposure_us=config.exposure_us, gain=config.gain, preview_size=(config.preview_width, config.preview_height))
    if config.source == "watch":
        return WatchFolder(config.watch_dir, poll_s=config.poll_s, done=processed_files(log_path or config.log),
                           settle_s=config.settle_s, truncated_grace_s=config.truncated_grace_s)
    return FakeCamera()


def run(
    config: RunConfig,
    config_files: list[Path] = (),
    source: FrameSource | None = None,
    on_result: Callable[[dict, Frame], None] | None = None,
    announce: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    verbose: bool = False,
) -> Daemon:
    """Load the model, open the source, serve the page if asked, and loop until done or signalled.

    Raises ModelUnavailable (no usable model), FileNotFoundError (no watch folder),
    CameraError (the camera did not come back) and OSError (web port taken).
    """
    from nebula.device.classify import open_classifier

    from nebula.device.identify import Identifier

    classifier = open_classifier(config.model, config.num_threads, config.tta)
    for note in classifier.runtime_notes if verbose else ():
        announce(note)
    identifier = Identifier.from_config(config)
    for problem in identifier.problems() if identifier else ():
        announce(f"warning: {problem}")
    source = source or make_source(config)
    lock = threading.Lock()
    server = None
    callbacks = [on_result] if on_result else []
    review = None
    if config.review:  # uncertain items are copied for labelling on the page (nebula.device.review)
        from nebula.device.review import ReviewQueue

        review = ReviewQueue.from_config(config, echo=announce)
        callbacks.append(review.consider)
    if config.web:
        from nebula.device.web import LiveState, start_server

        state = LiveState()
        server = start_server(classifier, config.host, config.port, state=state, lock=lock,
                              threshold=config.threshold, top_k=config.top_k,
                              max_uploads=config.max_uploads, upload_timeout_s=config.upload_timeout_s, review=review,
                              identifier=identifier)
        callbacks.append(state.update)
        announce(f"web page: {server.url}")

    def notify(record: dict, frame: Frame) -> None:
        for callback in callbacks:
            callback(record, frame)

    log = ResultsLog(config.log, fsync_s=config.log_fsync_s, max_bytes=int(config.log_max_mb * 2**20), keep=config.log_keep,
                     echo=announce)
    try:
        source.open(classifier.spec)
        write_resolved(config, list(config_files), {"model_path": str(classifier.path), "model_sha256": classifier.sha256})
        daemon = Daemon(
            classifier, source, log, threshold=config.threshold, top_k=config.top_k, smooth=config.smooth,
            max_fps=config.max_fps, max_frames=config.max_frames, sidecar=config.sidecar,
            on_result=notify if callbacks else None, lock=lock, identifier=identifier,
        )
        announce(f"classifying {config.source}{' ' + str(config.watch_dir) if config.source == 'watch' else ''} "
                 f"with {classifier.path}; results in {config.log}")
        with stop_on_signals(daemon):
            daemon.run()
    finally:
        source.close()
        log.close()
        if server is not None:
            server.stop()
    return daemon
