"""Workstation commands: data, backbone, train, evaluate. TensorFlow is imported inside each command."""

import click

from nebula.extras import require, require_workstation


@click.group()
def data():
    """Build labelled datasets (one sub-folder per label, plus manifest.csv)."""


@click.group()
def backbone():
    """Inspect and check the pretrained backbones."""


@backbone.command("list")
def backbone_list():
    """List the registered backbones with input size, MACs and where their weights come from."""
    from nebula.train import backbones

    for b in backbones.REGISTRY.values():
        click.echo(f"{b.name:22} {b.input_size:4}px  {b.macs / 1e6:8.0f} MMAC  {b.default_weights}")


@click.command()
def train():
    """Train a classifier by transfer learning."""
    require_workstation("train")
    raise click.ClickException("not implemented yet")


@click.command()
def evaluate():
    """Score a model on a labelled folder."""
    raise click.ClickException("not implemented yet")
