"""Configuration: defaults, then TOML files, then flags; clear one-line errors."""

from click.testing import CliRunner
import pytest

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
