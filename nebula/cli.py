"""The `nebula` command: a thin click group over the library.

Each command's module is imported only when that command runs (or when
``nebula --help`` lists them), so ``nebula classify`` on a Raspberry Pi loads
nothing from nebula.train or nebula.convert. Device commands (classify, bench,
run, serve) import no TensorFlow; workstation commands (data, backbone, train,
crossval, own-sky, evaluate, convert, catalog) import it inside the command.
"""

import importlib

import click

from nebula import __version__

# command name -> "module:attribute" of its click command
COMMANDS = {
    "data": "nebula.train.cli:data",
    "backbone": "nebula.train.cli:backbone",
    "train": "nebula.train.cli:train",
    "crossval": "nebula.train.cli:crossval",
    "crossval-compare": "nebula.train.cli:crossval_compare",
    "evaluate": "nebula.train.cli:evaluate",
    "own-sky": "nebula.train.cli:own_sky",
    "catalog": "nebula.train.cli:catalog",
    "convert": "nebula.convert.cli:convert",
    "classify": "nebula.device.cli:classify",
    "bench": "nebula.device.cli:bench",
    "run": "nebula.device.cli:run",
    "serve": "nebula.device.cli:serve",
}


class _LazyGroup(click.Group):
    """A group whose commands are imported by name on first use (click's documented lazy-loading pattern)."""

    def list_commands(self, ctx):
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx, name):
        if name not in self.commands and name in COMMANDS:
            module, attribute = COMMANDS[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return self.commands.get(name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="nebula")
def cli():
    """Tell what kind of nebula a telescope is looking at.

    \b
    Workstation:  nebula data stellarium -> nebula train -> nebula convert; nebula catalog build
    Raspberry Pi: nebula classify PHOTO.jpg | nebula run --source camera --web

    Run 'nebula COMMAND --help' for each command's options and an example.
    """


def main():
    cli()
