"""The `nebula convert` command."""

import sys
from pathlib import Path

import click

from nebula.extras import require_workstation


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default="models/nebula.tflite", show_default=True, type=click.Path(dir_okay=False), help="Model file to write.")
@click.option("--representative", default=200, show_default=True, help="Training images used to calibrate int8 ranges.")
@click.option("--seed", default=0, show_default=True, help="Seed for picking the representative images.")
@click.option("--force", is_flag=True, help="Write the model even if int8 fails the gate (validation + test photographs).")
@click.option("--check-tflite-runtime", "check_old", is_flag=True,
              help="Also classify the test split with tflite-runtime 2.14.0 (in .venv-tflite214) and compare top-1 answers.")
@click.option("--check-mediapipe", is_flag=True,
              help="Also classify the test split with MediaPipe Tasks' ImageClassifier (in .venv-mediapipe), which reads "
                   "only the standard TFLite metadata, and compare top-1 answers and label names.")
def convert(run_dir, out, representative, seed, force, check_old, check_mediapipe):
    """Convert a training run to a self-describing, fully int8 TFLite model.

    Quantizes with representative training images and scores float and int8 on the
    run's validation and test photographs (about 176). It refuses (exit 1), unless
    --force, if int8 gets more of them wrong than float by over 1 % of the images
    (at least 1 image: 2 of 176), or agrees with float on top-1 for under 97 % of
    them. Accuracy and macro-F1 are reported on the test split. The labels and a
    JSON manifest are embedded in the file, with standard TFLite metadata (labels,
    input normalisation) for other runtimes; labels.txt and manifest.json are also
    written beside it.

    Example: nebula convert models/runs/main --out models/nebula.tflite --check-mediapipe
    """
    require_workstation("convert")
    from nebula.convert.export import ConversionRefused, convert_run

    try:
        report = convert_run(run_dir, out, representative, seed, force, echo=lambda m: click.echo(m, err=True))
    except ConversionRefused as err:
        _print_scores(err.report)
        click.echo(f"Error: {err}", err=True)
        sys.exit(1)
    _print_scores(report)
    if report.failures:
        click.echo("WARNING (forced): " + "; ".join(report.failures), err=True)
    click.echo(f"Wrote {report.out} (sha256 {report.manifest['sha256'][:12]}), labels.txt and manifest.json beside it")
    if check_old:
        _check_old_runtime(report.out, run_dir)
    if check_mediapipe:
        _check_mediapipe(report.out, run_dir)


def _print_scores(report):
    """Float against int8 on the test split (accuracy, macro-F1, size, top-1 agreement), the gate's counts, the I/O quantization."""
    from nebula.convert.export import accuracy_sentence, agreement_sentence

    f, q = report.float_metrics, report.int8_metrics
    click.echo(f"{'':12}{'accuracy':>10}{'macro-F1':>10}{'size':>12}")
    click.echo(f"{'float':12}{f['accuracy']:>10.3f}{f['macro_f1']:>10.3f}{report.float_bytes / 1e6:>9.2f} MB")
    click.echo(f"{'int8':12}{q['accuracy']:>10.3f}{q['macro_f1']:>10.3f}{report.int8_bytes / 1e6:>9.2f} MB")
    click.echo(f"top-1 agreement float/int8: {100 * report.agreement:.1f}% on {report.manifest['metrics']['test_images']} test images; "
               f"mean |p_float - p_int8| {report.mean_abs_probability_difference:.4f}")
    g = report.gate
    splits = " + ".join(f"{count} {'validation' if split == 'val' else split}" for split, count in g["splits"].items())
    click.echo(f"gate on {g['images']} photographs ({splits}): float gets {g['float_correct']} right, int8 {g['int8_correct']} "
               f"({g['right_to_wrong']} lost, {g['wrong_to_right']} gained)")
    click.echo(f"  {accuracy_sentence(g['images'], g['float_correct'], g['int8_correct'])}")
    click.echo(f"  {agreement_sentence(g['images'], g['agreed'])}")
    q_in, q_out = report.manifest["input"], report.manifest["output"]
    click.echo(f"input  {q_in['dtype']} scale {q_in['scale']:g} zero point {q_in['zero_point']}; "
               f"output {q_out['dtype']} scale {q_out['scale']:g} zero point {q_out['zero_point']}")


def _check_old_runtime(model, run_dir):
    """tflite-runtime 2.14 (many Raspberry Pi OS Bookworm setups) must give the same top-1 answers as LiteRT."""
    import subprocess

    from nebula.convert.compat import compare_runtimes
    from nebula.train.run import load_run

    images = load_run(run_dir).image_paths("test")
    click.echo(f"Comparing top-1 answers with tflite-runtime 2.14.0 on {len(images)} test images (venv .venv-tflite214)", err=True)
    try:
        result = compare_runtimes(Path(model), images, Path(".venv-tflite214"))
    except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
        click.echo(f"Error: tflite-runtime 2.14 check could not run: {err}", err=True)
        sys.exit(1)
    click.echo(f"{result['backends'][0]} vs {result['backends'][1]}: same top-1 for {result['same_top1']} of {result['images']} images")
    gap, where = result["largest_score_gap"]
    if where:
        click.echo(f"largest difference in a shared top-1 score: {gap:.3f} ({Path(where).name})")
    if result["differences"]:
        for name, (new, old) in result["differences"].items():
            click.echo(f"  differs: {name}: {new[0]} {new[1]:.3f} vs {old[0]} {old[1]:.3f}", err=True)
        sys.exit(1)


def _check_mediapipe(model, run_dir):
    """MediaPipe's ImageClassifier, reading only the standard metadata, must name our labels and agree on top-1."""
    import subprocess

    from nebula.convert.mediapipe_check import DEFAULT_VENV, compare_with_mediapipe
    from nebula.train.run import load_run

    images = load_run(run_dir).image_paths("test")
    click.echo(f"Comparing top-1 answers with MediaPipe's ImageClassifier on {len(images)} test images (venv {DEFAULT_VENV})", err=True)
    try:
        result = compare_with_mediapipe(model, images, DEFAULT_VENV)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
        click.echo(f"Error: MediaPipe check could not run: {err}", err=True)
        sys.exit(1)
    ties = f", {len(result.ties)} more tied at our top score and broken the other way" if result.ties else ""
    click.echo(f"MediaPipe vs nebula classify: same top-1 for {result.same_top1} of {result.images} images{ties}; "
               f"largest score gap {result.largest_score_gap:.4f}")
    for name, cause in result.errors.items():
        click.echo(f"  not compared: {name}: {cause}", err=True)
    if result.unnamed:
        click.echo(f"Error: MediaPipe gave {result.unnamed} answers without a label name: it did not find the labels in the metadata", err=True)
    for name, (ours, theirs) in result.differences.items():
        click.echo(f"  differs: {Path(name).name}: {ours[0]} {ours[1]:.3f} vs {theirs[0]} {theirs[1]:.3f}", err=True)
    if not result.agrees:
        sys.exit(1)
