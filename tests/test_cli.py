"""The CLI starts, documents every command, and is a thin layer (sqlite-utils style)."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from nebula import __version__
from nebula.cli import cli


def _all_commands(group, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,), command
        if hasattr(command, "commands"):
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


def test_cli_does_not_import_tensorflow():
    code = "import sys, nebula.cli; sys.exit(any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
