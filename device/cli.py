"""Device commands: classify, bench, run, serve. No TensorFlow anywhere below this.

Every default a command shows comes from `RunConfig` (nebula.device.config), and
every command that classifies resolves its settings the same way: defaults, then
the config file, then the flags given. Options shared by several commands are
the decorators below, written once.
"""

import click

from nebula.device.config import DEFAULT_CATALOG, DEFAULT_MODEL, SOURCES, RunConfig
from nebula.device import formats


class _ModelExit(click.ClickException):
    """No usable model or runtime: exit 2, like a usage error, so scripts can tell it from a bad image."""

    exit_code = 2


def _classifier(model, num_threads, tta=1):
    from nebula.device.classify import ModelUnavailable, open_classifier

    try:
        return open_classifier(model, num_threads, tta)
    except ModelUnavailable as err:
        raise _ModelExit(str(err)) from None


model_option = click.option("--model", type=click.Path(dir_okay=False),
                            help=f"Model file [default: $NEBULA_MODEL or {DEFAULT_MODEL}].")
num_threads_option = click.option("--num-threads", type=click.IntRange(1), help="Interpreter threads [default: runtime's choice].")
tta_option = click.option("--tta", type=click.IntRange(1, 8),
                          help=f"Average N symmetric views (flips, rotations) of each image; N invokes [default: {RunConfig.tta}].")


verbose_option = click.option("-v", "--verbose", is_flag=True,
                              help="Also show the runtime's routine messages (its XNNPACK INFO line), once.")


def _show_runtime_notes(classifier, verbose: bool) -> None:
    for note in classifier.runtime_notes if verbose else ():
        click.echo(note, err=True)


def threshold_option(what: str = "answer"):
    return click.option("--threshold", type=click.FloatRange(0, 1),
                        help=f"Below this score the {what} is 'unknown' [default: {RunConfig.threshold}].")


def top_k_option(what: str = "listed per image"):
    return click.option("--top-k", type=click.IntRange(1), help=f"Candidates {what} [default: {RunConfig.top_k}].")


def catalog_options(function):
    """--catalog, --solve, --catalog-file: where a file points and what the catalogs say is there."""
    function = click.option("--catalog-file", type=click.Path(dir_okay=False),
                            help=f"Sky catalog file [default: $NEBULA_CATALOG or {DEFAULT_CATALOG}; 'nebula catalog build'].")(function)
    function = click.option("--solve/--no-solve", default=None,
                            help="Plate-solve files whose header has no position (astrometry.net; implies --catalog) [default: no].")(function)
    return click.option("--catalog/--no-catalog", default=None,
                        help="Read each FITS header's position and add the catalog's objects there, and whether "
                             "the model agrees with the catalog [default: no].")(function)


def _identifier(config):
    """The catalog look-up a configuration asks for; what cannot work here is said once, on stderr."""
    from nebula.device.identify import Identifier

    identifier = Identifier.from_config(config)
    for problem in identifier.problems() if identifier else ():
        click.echo(f"warning: {problem}", err=True)
    return identifier


review_dir_option = click.option("--review-dir", type=click.Path(file_okay=False),
                                 help="The review folder (nebula run queues into it, /review labels it) "
                                      "[default: review/ beside the log].")


def config_option(what: str = ""):
    return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                        help=f"TOML config file{what} [default: /etc/nebula-classifier/config.toml, "
                             "then ~/.config/nebula-classifier/config.toml].")


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@click.option("--files-from", type=click.File("r"), help="Also classify the paths listed in this file, one per line ('-' = stdin).")
@model_option
@top_k_option()
@threshold_option()
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl", "csv"]), default="table", show_default=True,
              help="table for people, jsonl for programs, csv for spreadsheets.")
@num_threads_option
@tta_option
@catalog_options
@click.option("--annotate-fits", "annotate_dir", type=click.Path(file_okay=False),
              help="Write a copy of each classified FITS file into this folder with the answers in its header "
                   "(NEBLABEL, NEBCATOB, NEBAGREE, ...); the original is never modified.")
@config_option(" (its model, num_threads, threshold, top_k, tta and [catalog])")
@verbose_option
@formats.in_help
def classify(paths, files_from, model, top_k, threshold, fmt, num_threads, tta, catalog, solve, catalog_file, annotate_dir,
             config_file, verbose):
    """Classify photographs: files or folders (recursive); {formats}.

    Linear FITS and 16-bit TIFF data are auto-stretched first; dark, flat and
    bias frames are skipped. Results stream out one line per image; an image
    that cannot be read gets one error line and the run goes on. Exit code 1
    if any image failed, 2 if there is no usable model.

    With --catalog, the position in a FITS header (WCS, RA/DEC, OBJCTRA/OBJCTDEC)
    is looked up in the sky catalog: the object there, its catalog label, and
    whether the model agrees; --solve plate-solves files without one.

    \b
    Examples:
      nebula classify ~/captures/M42.fits captures/2024-11-02/ --format jsonl
      nebula classify capture.fits --catalog --solve --annotate-fits annotated/
      find ~/captures -name '*.fits' -mmin -60 | nebula classify --files-from -
    """
    from nebula.device.classify import ResultWriter, classify_paths

    if files_from:
        paths = (*paths, *(line.strip() for line in files_from if line.strip()))
    if not paths:
        raise click.UsageError("give image files or folders, or --files-from FILE")

    flags = {"model": model, "top_k": top_k, "threshold": threshold, "num_threads": num_threads, "tta": tta,
             "catalog": catalog, "solve": solve, "catalog_file": catalog_file}
    config, _ = _run_config(flags, config_file)
    classifier = _classifier(config.model, config.num_threads, config.tta)
    _show_runtime_notes(classifier, verbose)
    identifier = _identifier(config)
    writer = ResultWriter(fmt, classifier.sha256, classifier.labels, config.top_k)
    seen = failed = 0
    for result in classify_paths(classifier, paths, top_k=config.top_k, threshold=config.threshold,
                                 identifier=identifier, annotate_dir=annotate_dir):
        writer.write(result)  # every input, a folder without images included, gives one result
        seen += 1
        failed += result.failed
    if failed:
        click.echo(f"{failed} of {seen} inputs failed", err=True)
        raise SystemExit(1)


def _progress_line(what: str, done: int, total: int) -> None:
    """One progress line on stderr, rewritten in place on a terminal; only the final count in a log."""
    import sys

    if sys.stderr.isatty():
        click.echo(f"\r{what}: {done}/{total}", err=True, nl=done == total)
    elif done == total:
        click.echo(f"{what}: {done}/{total}", err=True)


@click.command()
@model_option
@click.option("--images", default=200, show_default=True, type=click.IntRange(1), help="Synthetic camera frames to time.")
@click.option("--size", default="1024x768", show_default=True, help="Frame size WIDTHxHEIGHT of the generated JPEGs.")
@click.option("--threads", default="1,2", show_default=True, help="Interpreter thread counts to time, comma-separated.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results here as JSON.")
@click.option("--catalog-file", type=click.Path(exists=True, dir_okay=False),
              help="Also measure peak RSS for a FITS capture, without and with this catalog's look-up.")
def bench(model, images, size, threads, json_out, catalog_file):
    """Time each stage of classification on camera-sized JPEGs; peak memory and where it goes.

    Generates synthetic sky frames (noise, stars, a nebula glow) once, then for each
    thread count reports the median and p90 of decode, preprocess, invoke,
    postprocess, end to end (one file's latency), per image (the time between two
    answers when a folder is classified, the next file decoded while the model
    runs), a camera frame already in memory, and the bare invoke (the model alone,
    same input, repeated); and the ratios files / bare and camera / bare. Peak RSS
    comes from fresh processes with TensorFlow blocked (the device path only): one
    JPEG, with the resident size after each step; the `nebula classify` command;
    one FITS frame (read with numpy alone; astropy only for .fz); with --catalog-file, a
    FITS capture without and with --catalog.

    \b
    Example:
      nebula bench --model models/nebula.tflite --json models/bench.json
      nebula bench --images 20 --catalog-file models/skycatalog.npz
    """
    from nebula.device.bench import BenchError, format_table, run_bench

    try:
        width, height = (int(v) for v in size.lower().split("x"))
        thread_counts = [int(t) for t in threads.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter("expected WIDTHxHEIGHT such as 1024x768, and threads such as 1,2") from None
    _classifier(model, 1)  # one clear line now, before generating images, if the model is unusable
    try:
        report = run_bench(model, images=images, size=(width, height), thread_counts=thread_counts, progress=_progress_line,
                           catalog_file=catalog_file)
    except BenchError as err:
        raise click.ClickException(str(err)) from None
    click.echo(format_table(report))
    if json_out:
        import json
        from pathlib import Path

        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_out}", err=True)


def _run_config(flags: dict, config_file):
    from nebula.device.config import ConfigError, resolve

    try:
        return resolve(flags, config_file)
    except ConfigError as err:
        raise click.UsageError(str(err)) from None


def host_option(what: str = "Web page address"):
    return click.option("--host", help=f"{what} [default: {RunConfig.host}; 0.0.0.0 opens it to the LAN].")


def port_option(what: str = "Web page port"):
    return click.option("--port", type=click.IntRange(0, 65535), help=f"{what} [default: {RunConfig.port}].")


@click.command()
@click.option("--source", type=click.Choice(SOURCES), default=None,
              help=f"Where frames come from [default: {RunConfig.source}, or watch when --watch-dir is given].")
@click.option("--watch-dir", type=click.Path(file_okay=False), help="Folder to watch for new captures (with --source watch).")
@click.option("--web/--no-web", default=None, help="Also serve the web page [default: no].")
@host_option()
@port_option()
@model_option
@threshold_option()
@top_k_option("logged per item")
@click.option("--smooth", type=click.IntRange(1), help=f"Camera: average the last N frames [default: {RunConfig.smooth}; 1 = off].")
@click.option("--max-fps", type=click.FloatRange(0),
              help=f"Camera/fake: at most this many frames a second [default: {RunConfig.max_fps:g}; 0 = no limit].")
@click.option("--log", type=click.Path(dir_okay=False), help="Results log, JSON lines [default: ~/.local/state/nebula-classifier/results.jsonl].")
@click.option("--sidecar/--no-sidecar", default=None, help="Watch: write <capture>.json beside each capture [default: no].")
@click.option("--exposure-us", type=click.IntRange(1), help="Camera: manual exposure time in microseconds (auto-exposure off).")
@click.option("--gain", type=click.FloatRange(min=0, min_open=True), help="Camera: manual analogue gain (auto-exposure off).")
@click.option("--poll", "poll_s", type=click.FloatRange(min=0, min_open=True),
              help=f"Watch: seconds between looks at the folder [default: {RunConfig.poll_s:g}].")
@click.option("--max-frames", type=click.IntRange(1), help="Stop after this many items [default: run until stopped].")
@click.option("--review/--no-review", default=None,
              help="Copy uncertain items to the review folder, to label on the page's /review [default: yes].")
@review_dir_option
@num_threads_option
@tta_option
@catalog_options
@config_option()
@verbose_option
@formats.in_help
def run(config_file, verbose, **flags):
    """Classify live camera frames or new captures in a folder, until stopped.

    \b
    Sources:
      --source camera                    the Raspberry Pi camera (picamera2)
      --source watch --watch-dir DIR     new {formats} captures under DIR
                                         (INDI, Ekos/KStars <target>/Light/<filter>/, ...)
      --source fake                      generated frames, for a demo

    Every item gets one line in the results log (JSON lines, fsynced within
    log_fsync_s, rotated at log_max_mb); a capture is classified once, when
    complete (unchanged for settle_s), also across restarts and rotations. Settings
    come from defaults, then the config file, then these flags. SIGTERM or
    Ctrl-C finishes the current item and exits 0. With --catalog, each capture's
    line also has its position, the catalog's objects there and `agrees`.

    \b
    Examples:
      nebula run --source watch --watch-dir ~/Pictures/Ekos --sidecar --web --catalog --solve
      nebula run --source camera --exposure-us 2000000 --gain 8 --web --host 0.0.0.0
    """
    from nebula.device import daemon
    from nebula.device.camera import CameraError
    from nebula.device.classify import ModelUnavailable
    from nebula.device.web import WebServerError

    config, files = _run_config(flags, config_file)
    try:
        finished = daemon.run(config, files, announce=lambda line: click.echo(line, err=True), verbose=verbose)
    except ModelUnavailable as err:
        raise _ModelExit(str(err)) from None
    except (CameraError, WebServerError) as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:  # no watch folder, a log folder that is not writable
        raise click.ClickException(f"{err.filename}: {err.strerror}" if err.filename else str(err)) from None
    errors = f"{finished.errors} error{'' if finished.errors == 1 else 's'}"
    click.echo(f"stopped after {finished.count} items ({errors}); results in {config.log}", err=True)


@click.command()
@host_option("Address to listen on")
@port_option("Port")
@model_option
@threshold_option()
@top_k_option("shown per upload")
@num_threads_option
@tta_option
@catalog_options
@review_dir_option
@config_option(" (its [web] settings, model, num_threads, threshold, top_k, tta, [review] and [catalog])")
@verbose_option
@formats.in_help
def serve(host, port, model, threshold, top_k, num_threads, tta, catalog, solve, catalog_file, review_dir, config_file, verbose):
    """Serve the local web page: upload a photo, see the top candidates with confidence bars.

    Uploads up to 25 MB of {formats} (checked by content). For the
    live view of the telescope, use 'nebula run --web' instead. /review labels the
    uncertain frames 'nebula run' queued (--review-dir, as given to 'nebula run', or the [review] settings).
    Stops on Ctrl-C or SIGTERM.

    \b
    Example:
      nebula serve --model models/nebula.tflite --port 8080
    """
    from nebula.device import web

    flags = {"host": host, "port": port, "model": model, "threshold": threshold, "top_k": top_k, "num_threads": num_threads,
             "tta": tta, "catalog": catalog, "solve": solve, "catalog_file": catalog_file, "review_dir": review_dir}
    config, _ = _run_config(flags, config_file)
    classifier = _classifier(config.model, config.num_threads, config.tta)
    _show_runtime_notes(classifier, verbose)
    from nebula.device.review import ReviewQueue, review_folder  # the review view labels what nebula run queued

    review = ReviewQueue.from_config(config) if config.review and review_folder(config).is_dir() else None
    if config.review and config.review_dir and review is None:  # named, so a typo should not pass for an empty queue
        click.echo(f"warning: {config.review_dir}: no such review folder; /review is off", err=True)
    try:
        web.serve(classifier, config.host, config.port, announce=lambda line: click.echo(line, err=True),
                  threshold=config.threshold, top_k=config.top_k,
                  max_uploads=config.max_uploads, upload_timeout_s=config.upload_timeout_s, review=review,
                  identifier=_identifier(config))
    except web.WebServerError as err:
        raise click.ClickException(str(err)) from None
