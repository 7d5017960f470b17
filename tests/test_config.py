"""Configuration: defaults, then TOML files, then flags; clear one-line errors; every route reads it."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import sky_image

from nebula.cli import cli
from nebula.device.config import SYSTEM_CONFIG, ConfigError, RunConfig, resolve, resolved_path, user_config_path


def _env(tmp_path):
    return {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}


def _none_given(**given):
    flags = dict.fromkeys(RunConfig.__dataclass_fields__)
    flags.update(given)
    return flags


@pytest.mark.skipif(SYSTEM_CONFIG.exists(), reason=f"{SYSTEM_CONFIG} exists on this machine")
def test_defaults_without_files_or_flags(tmp_path):
    config, files = resolve(_none_given(), env=_env(tmp_path))
    assert files == []
    assert config.host == "127.0.0.1" and config.smooth == 5 and config.threshold == 0.5


def test_user_file_then_flags_win(tmp_path):
    env = _env(tmp_path)
    path = user_config_path(env)
    path.parent.mkdir(parents=True)
    path.write_text('source = "watch"\nthreshold = 0.7\nsmooth = 8\n[watch]\ndir = "~/captures"\npoll_s = 2\n[web]\nenabled = true\nport = 9000\n[camera]\ngain = 4\n')
    config, files = resolve(_none_given(threshold=0.3), env=env)
    assert path in files
    assert config.source == "watch" and config.watch_dir.endswith("/captures") and "~" not in config.watch_dir
    assert config.threshold == 0.3  # the flag wins
    assert config.smooth == 8 and config.poll_s == 2.0 and config.web is True and config.port == 9000 and config.gain == 4.0


def test_explicit_config_replaces_the_default_files(tmp_path):
    env = _env(tmp_path)
    user = user_config_path(env)
    user.parent.mkdir(parents=True)
    user.write_text("smooth = 8\n")
    explicit = tmp_path / "night.toml"
    explicit.write_text("top_k = 2\n")
    config, files = resolve(_none_given(), explicit, env=env)
    assert files == [explicit] and config.top_k == 2 and config.smooth == 5


def test_the_reliability_settings_come_from_the_file(tmp_path):
    path = tmp_path / "night.toml"
    path.write_text("log_fsync_s = 0\nlog_max_mb = 2.5\nlog_keep = 3\n[watch]\nsettle_s = 5\ntruncated_grace_s = 120\n"
                    "[web]\nmax_uploads = 1\nupload_timeout_s = 4\n")
    config, _ = resolve(_none_given(), path, env=_env(tmp_path))
    assert (config.log_fsync_s, config.log_max_mb, config.log_keep) == (0.0, 2.5, 3)
    assert (config.settle_s, config.truncated_grace_s, config.max_uploads, config.upload_timeout_s) == (5.0, 120.0, 1, 4.0)
    for text, message in (("log_keep = 0\n", "log_keep must be at least 1"), ("[web]\nmax_uploads = 0\n", "max_uploads must be at least 1")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            resolve(_none_given(), path, env=_env(tmp_path))


@pytest.mark.parametrize("text,message", [
    ("smoth = 3\n", "unknown setting 'smoth'"),

    ("smooth = 'three'\n", "smooth must be int, not str"),
    ("[web]\nenabled = 1\n", "web must be bool, not int"),
    ("threshold = [\n", "not valid TOML"),
])
def test_bad_files_are_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        resolve(_none_given(), path, env=_env(tmp_path))
    assert str(err.value).startswith(str(path)) and message in str(err.value) and "\n" not in str(err.value)


def test_watch_dir_alone_means_watch_and_watch_needs_a_dir(tmp_path):
    config, _ = resolve(_none_given(watch_dir=str(tmp_path)), env=_env(tmp_path))
    assert config.source == "watch"
    with pytest.raises(ConfigError, match="needs a folder"):
        resolve(_none_given(source="watch"), env=_env(tmp_path))


def test_resolved_configuration_goes_beside_the_log():
    assert str(resolved_path("/var/lib/nebula/results.jsonl")) == "/var/lib/nebula/results.config.json"


def test_cli_reports_a_bad_config_as_a_usage_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("colour = 'red'\n")
    result = CliRunner().invoke(cli, ["run", "--config", str(path)])
    assert result.exit_code == 2
    assert "unknown setting 'colour'" in result.output


# --- a config file's threshold and top_k reach every route --------------------------------------
# threshold = 1.0 makes every answer 'unknown' (an int8 score tops out at 255/256); top_k = 2 is not the default.

_ROUTE_CONFIG = "threshold = 1.0\ntop_k = 2\n"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def route_config(tmp_path):
    path = tmp_path / "night.toml"
    path.write_text(_ROUTE_CONFIG)
    return path


@pytest.fixture
def emission_png(tmp_path):
    path = tmp_path / "M42.png"
    Image.fromarray(sky_image("emission", size=96, seed=5000)).save(path)
    return path


def _judged_by_the_config(record):
    return record["label"] == "unknown" and len(record["top_k"]) == 2


def test_config_threshold_reaches_classify(tiny_model_file, route_config, emission_png):
    args = ["classify", str(emission_png), "--model", str(tiny_model_file), "--format", "jsonl", "--config", str(route_config)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert _judged_by_the_config(json.loads(result.stdout))
    flagged = json.loads(CliRunner().invoke(cli, [*args, "--threshold", "0"]).stdout)  # the flag wins over the file
    assert flagged["label"] == "emission" and len(flagged["top_k"]) == 2


def test_config_threshold_reaches_run(tiny_model_file, route_config, tmp_path):
    log = tmp_path / "r.jsonl"
    result = CliRunner().invoke(cli, ["run", "--source", "fake", "--max-frames", "3", "--max-fps", "0", "--model", str(tiny_model_file),
                                      "--log", str(log), "--config", str(route_config)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 3 and all(_judged_by_the_config(line) for line in lines)


@contextmanager
def _serving(args):
    """Start `nebula ARGS` (serve, or run --web) in its own process; yield the page's URL; SIGTERM it after."""
    process = subprocess.Popen([sys.executable, "-m", "nebula", *args], cwd=ROOT, stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        url, deadline = None, time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line.startswith("web page:"):
                url = line.split()[-1]
        assert url, "the web page did not start"
        yield url
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def _upload(url, path):
    request = urllib.request.Request(url + "api/classify", data=path.read_bytes(), method="POST",
                                     headers={"X-Filename": path.name, "Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_config_threshold_reaches_serve(tiny_model_file, route_config, emission_png):
    with _serving(["serve", "--port", "0", "--model", str(tiny_model_file), "--config", str(route_config)]) as url:
        assert _judged_by_the_config(_upload(url, emission_png))


def test_config_threshold_reaches_the_page_of_run_web(tiny_model_file, route_config, emission_png, tmp_path):
    args = ["run", "--source", "fake", "--web", "--port", "0", "--model", str(tiny_model_file), "--log", str(tmp_path / "r.jsonl"),
            "--config", str(route_config)]
    with _serving(args) as url:
        assert _judged_by_the_config(_upload(url, emission_png))
        deadline = time.monotonic() + 30  # SIGTERM once the loop runs (its signal handlers are set by then)
        while time.monotonic() < deadline and not ((tmp_path / "r.jsonl").exists() and (tmp_path / "r.jsonl").read_text()):
            time.sleep(0.05)
    assert all(_judged_by_the_config(json.loads(line)) for line in (tmp_path / "r.jsonl").read_text().splitlines())
