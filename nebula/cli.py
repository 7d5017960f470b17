"""The `nebula` command: a thin click group over the library.

Device commands (classify, bench, run, serve) import no TensorFlow. Workstation
commands (data, backbone, train, evaluate, convert) import it inside the command,
so `nebula --help` works on a Raspberry Pi with only the device install.
"""

import click

from nebula import __version__
from nebula.convert import cli as convert_cli
from nebula.device import cli as device_cli
from nebula.train import cli as train_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="nebula")
def cli():
    """Tell what kind of nebula a telescope is looking at.

    \b
    Workstation:  nebula data stellarium -> nebula train -> nebula convert
    Raspberry Pi: nebula classify PHOTO.jpg | nebula run --source camera --web

    Run 'nebula COMMAND --help' for each command's options and an example.
    """


for command in (
    train_cli.data,
    train_cli.backbone,
    train_cli.train,
    train_cli.crossval,
    train_cli.evaluate,
    convert_cli.convert,
    device_cli.classify,
    device_cli.bench,
    device_cli.run,
    device_cli.serve,
):
    cli.add_command(command)


def main():
    cli()
