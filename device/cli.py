"""Device commands: classify, bench, run, serve. No TensorFlow anywhere below this."""

import click


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--model", type=click.Path(dir_okay=False), help="Model file [default: $NEBULA_MODEL or models/nebula.tflite]")
@click.option("--top-k", default=3, show_default=True, help="Candidates listed per image.")
@click.option("--threshold", default=0.0, show_default=True, help="Below this score the answer is 'unknown'.")
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl", "csv"]), default="table", show_default=True)
@click.option("--num-threads", type=int, default=None, help="Interpreter threads [default: runtime's choice].")
def classify(paths, model, top_k, threshold, fmt, num_threads):
    """Classify photographs: files or folders (recursive); JPEG, PNG, TIFF, FITS.

    Example: nebula classify ~/captures/M42.fits --format jsonl
    """
    raise click.ClickException("not implemented yet")


@click.command()
def bench():
    """Time each stage of classification on camera-sized images."""
    raise click.ClickException("not implemented yet")


@click.command()
def run():
    """Classify live camera frames or new captures in a folder."""
    raise click.ClickException("not implemented yet")


@click.command()
def serve():
    """Serve the local web page."""
    raise click.ClickException("not implemented yet")
