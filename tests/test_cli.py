"""The CLI starts, documents every command, and is a thin layer (sqlite-utils style)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from nebula import __version__
from nebula.cli import COMMANDS, cli


def _all_commands(group, prefix=()):
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from _all_commands(command, prefix + (name,))


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"nebula, version {__version__}\n"


@pytest.mark.parametrize("path,command", list(_all_commands(cli)), ids=lambda p: " ".join(p) if isinstance(p, tuple) else "")
def test_every_command_has_help(path, command):
    result = CliRunner().invoke(cli, [*path, "-h"])
    assert result.exit_code == 0, result.output
    assert command.help and len(command.help.strip()) > 20, f"nebula {' '.join(path)} has no real help text"


def test_every_command_is_listed_and_loads():
    listed = [path for path, _ in _all_commands(cli)]
    assert {path[0] for path in listed} == set(COMMANDS) and ("data", "merge") in listed


# What `nebula ...` imported, printed as JSON on stderr when it exits.
_MODULES_AT_EXIT = (
    "import atexit, json, sys\n"
    "atexit.register(lambda: print('MODULES ' + json.dumps(sorted(sys.modules)), file=sys.stderr))\n"
    "sys.argv = ['nebula', *sys.argv[1:]]\n"
    "from nebula.cli import main\n"
    "main()\n"
)


def _modules_loaded_by(*args) -> list[str]:
    done = subprocess.run([sys.executable, "-c", _MODULES_AT_EXIT, *map(str, args)], capture_output=True, text=True)
    line = next(line for line in done.stderr.splitlines() if line.startswith("MODULES "))
    return json.loads(line[len("MODULES "):])


def _workstation(modules):
    return [m for m in modules if m.startswith(("nebula.train", "nebula.convert", "tensorflow", "keras"))]


def test_classify_help_loads_nothing_of_training_or_conversion():
    modules = _modules_loaded_by("classify", "--help")
    assert "nebula.device.cli" in modules and _workstation(modules) == []


def test_classify_of_an_image_loads_nothing_of_training_or_conversion(tiny_model_file, tmp_path):
    from PIL import Image

    from conftest import sky_image

    Image.fromarray(sky_image("emission", size=96)).save(tmp_path / "M42.png")
    modules = _modules_loaded_by("classify", tmp_path / "M42.png", "--model", tiny_model_file)
    assert "nebula.device.runtime" in modules and _workstation(modules) == []


def test_the_run_folder_and_conversion_load_no_training_code():
    code = "import sys, nebula.train.run, nebula.convert.cli, nebula.convert.export; print(sorted(sys.modules))"
    modules = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for heavy in ("nebula.train.fit", "nebula.train.dataset", "nebula.train.augment", "tensorflow", "keras"):
        assert f"'{heavy}'" not in modules, heavy


def test_train_options_are_the_train_config_fields(monkeypatch, tmp_path):
    """Each TrainConfig field is a `nebula train` option with the field's default, and reaches the config."""
    from nebula.train import cli as train_cli, fit

    train_cli.train.get_params(click.Context(train_cli.train))  # makes the TrainConfig options
    options = {p.name: p for p in train_cli.train.params}
    expected = {f.name: f.default for f in dataclasses.fields(fit.TrainConfig) if f.name not in ("data", "out", "weights")}
    assert {name: options[name].default for name in expected} == expected
    assert set(options) == {*expected, "data", "out"}
    assert all(options[name].help for name in options)

    seen = []

    def noting_train(config, echo):  # stands in for training: notes the config it got, then stops
        seen.append(config)
        raise fit.TrainingError("stop")

    monkeypatch.setattr(train_cli, "require_workstation", lambda command: None)  # TensorFlow is not what this checks
    monkeypatch.setattr(fit, "train", noting_train)
    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--epochs", "3",
                                      "--no-snap-weights", "--val", "0.2", "--backbone", "tiny"])
    assert result.exit_code == 1 and "stop" in result.output
    (config,) = seen
    assert (config.epochs, config.snap_weights, config.val, config.backbone) == (3, False, 0.2, "tiny")
    assert config.head_epochs == fit.TrainConfig.head_epochs


def test_cli_does_not_import_tensorflow():
    code = "import sys, nebula.cli; sys.exit(any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_models_folder_keeps_its_readme_and_ignores_what_make_writes():
    """models/README.md is in the tree; what `make train/convert/bench` writes there is not."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    generated = ["models/nebula.tflite", "models/labels.txt", "models/manifest.json", "models/bench.json", "models/runs/main/model.keras"]
    check = subprocess.run(["git", "check-ignore", "--no-index", *generated, "models/README.md"], cwd=repo, capture_output=True, text=True)
    assert check.stdout.split() == generated
    assert (repo / "models" / "README.md").is_file()
