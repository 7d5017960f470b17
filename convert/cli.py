"""The `nebula convert` command."""

import click

from nebula.extras import require_workstation


@click.command()
def convert():
    """Convert a trained run to a fully int8 TFLite model."""
    require_workstation("convert")
    raise click.ClickException("not implemented yet")
