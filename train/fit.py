"""The training procedure behind `nebula train`: transfer learning that is fast on two CPU cores.

    nebula train --data data/stellarium --out models/runs/main

1. Split by object group (grouped_split), so no nebula is in both train and test.
2. Round the backbone's weights onto the int8 grid the converter will use
   (nebula.train.int8_grid), unless --no-snap-weights.
3. Decode every image once; make `views` views of each training image (view 0
   plain, the rest augmented) and push them once through the frozen bottom of the
   backbone -- the units below the `--unfreeze` cut. Those cached tensors are
   all the later phases train on, which is what makes them fast.
4. Phase 1 (head): the top units stay frozen; their pooled features train the
   head (dropout + dense softmax) with class-balanced sample weights (Adam; --head
   logistic solves it as an L2 logistic regression instead, linear_head.py).
5. Phase 2 (fine-tune, if --unfreeze N > 0): the top N units and the head train
   together on the cached tensors at a low learning rate. BatchNorm stays frozen.
   The tuned units are rounded onto the int8 grid again and validation is re-scored.
Each Adam phase stops early on validation macro-F1 and keeps its best epoch; phase 2
starts from phase 1's best, so it can only replace it by beating it on validation.
The test split is scored once, at the end, with the device's preprocessing.

Models are built inside a tf.distribute strategy (`--strategy`, see distribution_strategy):
by default MirroredStrategy when several GPUs are visible (one process then uses them all),
else the default strategy. `--init-from RUN` starts every weight from a trained run.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from nebula.device.preprocess import PreprocessSpec
from nebula.train import report, run as runfiles
from nebula.train import calibrate, linear_head
from nebula.train.augment import RECIPES, save_grid, view_rng
from nebula.train.dataset import (
    DecodedImages,
    augmented_views,
    class_weights,
    decode_rows,
    image_batches,
    training_pipeline,
    view_labels,
)
from nebula.train.evaluate import Evaluation, format_scores, predict_keras, score
from nebula.train.manifest import LABELS, grouped_split, label_counts, load_dataset


@dataclass
class TrainConfig:
    """Defaults, then flags; the resolved values are written to config.json."""

    data: str
    out: str
    backbone: str = "efficientnet_lite0"
    weights: str = "pretrained"
    head: str = "dense"  # phase 1: dense (Adam, early stopping) or logistic (linear_head.py; not better: README)
    head_l2: float = linear_head.DEFAULT_L2  # the logistic head's L2 penalty
    head_epochs: int = 40  # the most epochs of phase 1 with the dense head (cached features: a fraction of a second each)
    epochs: int = 12  # the most epochs of phase 2 (fine-tuning); early stopping may end either phase sooner
    unfreeze: int = 2  # top units fine-tuned in phase 2 (0 = head only)
    views: int = 4  # views per training image: the plain one + augmented ones
    seed: int = 0
    batch_size: int = 32
    head_lr: float = 1e-3
    finetune_lr: float = 1e-4
    dropout: float = 0.3
    snap_weights: bool = True  # backbone kernels rounded to the int8 grid before training (nebula.train.int8_grid)
    crops: bool = True  # train on the dataset's catalog-guided crops too (never in val or test)
    augment: str = "shifted"  # augmentation recipe: nebula.train.augment.RECIPES ("sky" reproduces the earlier recipe)
    normalize: str = "none"  # per-image normalisation, written into the run's spec: nebula.device.preprocess.NORMALIZE_MODES
    calibrate: bool = True  # fit a temperature on validation and fold it into the classifier
    class_balance: float = 0.5  # power of the inverse-frequency class weights: 0 none, 1 fully balanced
    patience: int = 4  # epochs without a better validation macro-F1 before a phase stops
    val: float = 0.15
    test: float = 0.15
    init_from: str | None = None  # a run folder whose backbone and head weights this run starts from (same labels)
    strategy: str = "auto"  # auto | mirrored | multiworker: see distribution_strategy


class TrainingError(Exception):
    """A run that cannot start; the message is one line saying why."""


@dataclass
class TrainResult:
    run_dir: Path
    labels: list[str]
    test: Evaluation
    metrics: dict


def split_with_crops(rows, config: TrainConfig) -> dict[str, list]:
    """The object-grouped split of the photographs; crops join train unless their group is in val or test (then dropped).

    Val and test hold whole photographs only, so their scores compare with runs without crops.
    """
    photos = [r for r in rows if r.origin != "crop"]
    splits = grouped_split(photos, val=config.val, test=config.test, seed=config.seed)
    if config.crops:
        held = {r.group for split in ("val", "test") for r in splits[split]}
        splits["train"] = sorted(splits["train"] + [r for r in rows if r.origin == "crop" and r.group not in held],
                                 key=lambda r: r.file)
    return splits


def ordered_labels(rows) -> list[str]:
    """The dataset's labels: the project's known labels in their fixed order, then any others sorted."""
    present = {r.label for r in rows}
    return [label for label in LABELS if label in present] + sorted(present - set(LABELS))


STRATEGIES = ("auto", "mirrored", "multiworker")


def distribution_strategy(kind: str = "auto"):
    """The tf.distribute strategy that `nebula train --strategy` names.

    auto: MirroredStrategy over all visible GPUs when there are several, else the default strategy.
    mirrored: MirroredStrategy over every GPU, or over every logical CPU device when there is no GPU.
    multiworker: MultiWorkerMirroredStrategy; each machine runs the same command with its own
    TF_CONFIG (README, "Learn from your own sky"), and without TF_CONFIG it is one worker.
    """
    import tensorflow as tf

    if kind not in STRATEGIES:
        raise TrainingError(f"--strategy {kind}: must be one of {', '.join(STRATEGIES)}")
    if kind == "multiworker":  # before anything starts TensorFlow's runtime: its collective ops are set up at start
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy([d.name for d in gpus or tf.config.list_logical_devices("CPU")])
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def init_from_run(run_dir: str | Path, backbone, classifier, labels: list[str], backbone_name: str,
                  normalize: str = "none") -> None:
    """Start from a trained run (`--init-from RUN`): copy its backbone (tuned units included) and its head.

    The head's outputs are the labels, so the run's labels must be this dataset's, in order.
    """
    import keras

    from nebula.train.run import RunError, load_run

    try:
        run = load_run(run_dir)
    except RunError as err:
        raise TrainingError(f"--init-from {run_dir}: {err}") from None
    if run.labels != labels:
        raise TrainingError(f"--init-from {run_dir}: its labels ({', '.join(run.labels)}) are not this dataset's "
                            f"({', '.join(labels)}); fine-tuning keeps the head's outputs, so train without --init-from")
    if run.config.get("backbone", backbone_name) != backbone_name:
        raise TrainingError(f"--init-from {run_dir}: it was trained on backbone {run.config['backbone']}, not {backbone_name}")
    if run.spec.normalize != normalize:
        raise TrainingError(f"--init-from {run_dir}: it was trained with --normalize {run.spec.normalize}, not {normalize}")
    saved = keras.saving.load_model(run.model_path, compile=False)
    backbone.set_weights(saved.get_layer(backbone.name).get_weights())
    classifier.build((None, backbone.output_shape[-1]))
    classifier.set_weights(saved.get_layer("classifier").get_weights())


def make_deterministic(seed: int) -> None:
    """Same seed, same run: seeds Python, NumPy and TensorFlow, and asks TF for deterministic ops."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def macro_f1_and_accuracy(probs: np.ndarray, truth: np.ndarray, labels: list[str]) -> tuple[float, float]:
    s = score([labels[i] for i in truth], [labels[i] for i in probs.argmax(1)], labels)
    return s["macro_f1"], s["accuracy"]


def fit_with_early_stopping(name, model, train_data, val_inputs, val_truth, labels, epochs, patience, batch_size, echo, history,
               best=None, strategy=None):
    """Fit with early stopping on validation macro-F1; restores the best weights. Returns (macro-F1, accuracy).

    Keras's fit, except under MultiWorkerMirroredStrategy, where Keras 3's fit fails with two
    workers and nebula.train.multiworker runs the same steps in its own loop.
    """
    import keras

    from nebula.train import multiworker

    best_f1, best_acc, best_weights = best if best else (-1.0, 0.0, None)
    since_best = 0
    own_loop = strategy is not None and multiworker.is_multiworker(strategy)

    def end_of_epoch(epoch: int, loss: float) -> bool:
        """Scores validation, keeps the best weights, logs the epoch; True when the phase should stop.

        With several workers, Keras's predict works (unlike its fit) and gathers every worker's
        share, so all workers score the same probabilities and stop at the same epoch.
        """
        nonlocal best_f1, best_acc, best_weights, since_best
        probs = model.predict(val_inputs, batch_size=batch_size, verbose=0)
        f1, acc = macro_f1_and_accuracy(probs, val_truth, labels)
        improved = f1 > best_f1 + 1e-6
        if improved:
            best_f1, best_acc, best_weights = f1, acc, model.get_weights()
            since_best = 0
        else:
            since_best += 1
        history.append({"epoch": epoch + 1, "loss": loss, "val_accuracy": acc, "val_macro_f1": f1})
        echo(f"{name} epoch {epoch + 1:>2}/{epochs}  loss {loss:.4f}  val acc {acc:.3f}  "
             f"val macro-F1 {f1:.3f}{'  *best' if improved else ''}")
        return since_best >= patience

    if own_loop:
        multiworker.fit(model, train_data, epochs, strategy, end_of_epoch)
    else:
        class BestOnValidation(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if end_of_epoch(epoch, float(logs["loss"])):
                    self.model.stop_training = True

        model.fit(train_data, epochs=epochs, shuffle=False, verbose=1 if sys.stdout.isatty() else 0,
                  callbacks=[BestOnValidation()])
    if best_weights is not None:
        model.set_weights(best_weights)
    return best_f1, best_acc


def train(config: TrainConfig, echo: Callable[[str], None] = print) -> TrainResult:
    """Run the whole procedure and write the run folder; returns the test-split evaluation.

    Under --strategy multiworker every worker runs all of it, and only the chief writes --out:
    the others write a scratch folder, removed at the end (TF's pattern for non-chief workers:
    they take part in every step, and whatever they save goes to a temporary place).
    """
    from nebula.train import multiworker

    if config.head not in linear_head.HEADS:
        raise TrainingError(f"--head {config.head}: not one of {', '.join(linear_head.HEADS)}")
    data_dir = Path(config.data).resolve()
    if not data_dir.is_dir():
        raise TrainingError(f"{data_dir}: no such dataset folder")
    strategy = distribution_strategy(config.strategy)  # first: multiworker must start before any TensorFlow op
    if multiworker.is_chief(strategy):
        return _train(config, strategy, Path(config.out), echo)
    task_type, index = multiworker.worker(strategy)
    with tempfile.TemporaryDirectory(prefix=f"nebula-{task_type}{index}-") as scratch:
        echo(f"{task_type} {index} of the cluster: not the chief, so its run folder is a scratch copy in {scratch}, "
             f"removed at the end; the chief writes {config.out}")
        return _train(config, strategy, Path(scratch) / Path(config.out).name, echo)


def _train(config: TrainConfig, strategy, out: Path, echo: Callable[[str], None]) -> TrainResult:
    import keras

    from nebula.train import backbones, int8_grid

    t_start = time.perf_counter()
    wall: dict[str, float] = {}
    data_dir = Path(config.data).resolve()
    try:
        backbone_info = backbones.get(config.backbone)
    except KeyError as err:
        raise TrainingError(str(err.args[0])) from None
    rows = load_dataset(data_dir)
    if not rows:
        raise TrainingError(f"{data_dir}: no labelled images (expected manifest.csv or one sub-folder per label)")
    labels = ordered_labels(rows)
    if len(labels) < 2:
        raise TrainingError(f"{data_dir}: only one label ({labels[0]}); a classifier needs two or more")
    make_deterministic(config.seed)
    splits = split_with_crops(rows, config)
    for split in ("train", "val"):
        if not splits[split]:
            raise TrainingError(f"{data_dir}: the {split} split is empty ({len(rows)} images are too few to split by group)")
    spec = replace(backbone_info.preprocess, normalize=config.normalize)
    out.mkdir(parents=True, exist_ok=True)
    runfiles.write_split(out / runfiles.SPLIT_NAME, splits)
    runfiles.write_image_list(out / runfiles.TEST_IMAGES_NAME, [Path(data_dir) / r.file for r in splits["test"]])
    echo(f"{len(rows)} images, {len(labels)} labels; split by object group: "
         + ", ".join(f"{s} {len(splits[s])}" for s in ("train", "val", "test")))

    # Decode once.
    t = time.perf_counter()
    warn = lambda line: echo(line)  # noqa: E731
    train_images = decode_rows(splits["train"], data_dir, spec, labels, keep_reduced=True, progress="decode train", warn=warn)
    val_images = decode_rows(splits["val"], data_dir, spec, labels, progress="decode val", warn=warn)
    wall["decode_s"] = time.perf_counter() - t
    if not len(train_images) or not len(val_images):
        raise TrainingError(f"{data_dir}: no readable images in the train or val split")
    _save_augment_samples(train_images, spec, config, out / runfiles.AUGMENT_PNG)

    echo(f"strategy {type(strategy).__name__} over {strategy.num_replicas_in_sync} replica(s); "
         f"backbone {config.backbone} {spec.input_size}px, unfreeze {config.unfreeze}, {config.views} views/image")
    history: dict[str, list[dict]] = {"phase 1: head": [], "phase 2: fine-tune": []}
    with strategy.scope():
        try:
            backbone = backbones.create(config.backbone, config.weights)
        except backbones.BackboneUnavailable as err:
            raise TrainingError(str(err)) from None
        snapped = int8_grid.snap(backbone) if config.snap_weights else 0
        if snapped:
            echo(f"rounded {snapped} backbone kernels onto the int8 grid the converter will use (--no-snap-weights: keep them exact)")
        # layers[:cut] are frozen and their output cached; head-only caches the pooled features.
        try:
            cut = frozen_cut(backbone, config.unfreeze)
        except ValueError as err:  # --unfreeze beyond the backbone's units
            raise TrainingError(str(err)) from None
        backbone.trainable = False
        bottom = chain(backbone.layers[:cut], keras.Input((spec.input_size, spec.input_size, 3)), "bottom")
        if config.unfreeze:
            top_frozen = chain(backbone.layers[cut:], keras.Input(tuple(bottom.outputs[0].shape[1:])), "top")
        dropout = keras.layers.Dropout(config.dropout, name="head_dropout")
        classifier = keras.layers.Dense(len(labels), activation="softmax", name="classifier")
        if config.init_from:
            init_from_run(config.init_from, backbone, classifier, labels, config.backbone, config.normalize)
            echo(f"starting from {config.init_from}: its backbone and head weights"
                 + ("; the logistic head is solved again on this data" if config.head == "logistic" else ""))

    # Cache the frozen bottom's output for every training view and validation image.
    t = time.perf_counter()
    n_views = len(train_images) * config.views
    echo(f"caching the frozen bottom ({cut} of {len(backbone.layers)} layers) for {n_views} training views")
    augmenter = RECIPES[config.augment]
    cached_train = predict_with_progress(bottom, augmented_views(train_images, spec, config.views, config.seed, config.batch_size, augmenter),
                                          n_views, config.batch_size, "training views")
    cached_val = bottom.predict(image_batches(val_images.prepared, config.batch_size), verbose=0)
    y_train = view_labels(train_images, config.views)
    weights = class_weights(y_train, len(labels), config.class_balance)[y_train]
    features_train = top_frozen.predict(cached_train, batch_size=config.batch_size, verbose=0) if config.unfreeze else cached_train
    features_val = top_frozen.predict(cached_val, batch_size=config.batch_size, verbose=0) if config.unfreeze else cached_val
    wall["cache_s"] = time.perf_counter() - t

    # Phase 1: the head on pooled features.
    t = time.perf_counter()
    with strategy.scope():
        head_input = keras.Input(features_train.shape[1:])
        head = keras.Model(head_input, classifier(dropout(head_input)), name="head")
        head.compile(optimizer=keras.optimizers.Adam(config.head_lr), loss="sparse_categorical_crossentropy")
    if config.head == "logistic":
        with strategy.scope():
            classifier.set_weights(list(linear_head.fit(features_train, y_train, weights, len(labels), config.head_l2)))
        best = macro_f1_and_accuracy(head.predict(features_val, batch_size=config.batch_size, verbose=0),
                                     val_images.labels, labels)
        train_probs = head.predict(features_train, batch_size=config.batch_size, verbose=0)
        train_loss = float((weights * -np.log(train_probs[np.arange(len(y_train)), y_train] + 1e-12)).mean())
        history["phase 1: head"].append({"epoch": 1, "loss": train_loss, "val_accuracy": best[1], "val_macro_f1": best[0]})
        echo(f"phase 1 (head) logistic, L2 {config.head_l2:g}, solved in {time.perf_counter() - t:.1f} s  "
             f"val acc {best[1]:.3f}  val macro-F1 {best[0]:.3f}")
    else:
        data = training_pipeline(features_train, y_train, weights, config.batch_size, config.seed)
        best = fit_with_early_stopping("phase 1 (head)", head, data, features_val, val_images.labels, labels,
                                       config.head_epochs, config.patience, config.batch_size, echo,
                                       history["phase 1: head"], strategy=strategy)
    validation = {"phase1": {"macro_f1": best[0], "accuracy": best[1]}}
    wall["phase1_s"] = time.perf_counter() - t

    # Phase 2: the top units + head on the cached bottom output.
    if config.unfreeze:
        t = time.perf_counter()
        top, phase2, phase2_snapped = fine_tune_top(backbone, cut, dropout, classifier, cached_train, y_train, weights,
                                                    cached_val, val_images.labels, labels, config, config.seed + 1, best,
                                                    echo, history["phase 2: fine-tune"], strategy)
        validation["phase2"] = {"macro_f1": phase2[0], "accuracy": phase2[1]}
        best = phase2_snapped or phase2
        if phase2_snapped:
            validation["phase2_snapped"] = {"macro_f1": phase2_snapped[0], "accuracy": phase2_snapped[1]}
        wall["phase2_s"] = time.perf_counter() - t
    validation["final"] = {"macro_f1": best[0], "accuracy": best[1]}

    # Temperature scaling on validation, folded into the classifier: the threshold then means a probability.
    final_val = (top if config.unfreeze else head).predict(cached_val if config.unfreeze else features_val,
                                                            batch_size=config.batch_size, verbose=0)
    temperature = calibrate.fit_temperature(final_val, val_images.labels) if config.calibrate else 1.0
    calibration = {"temperature": temperature,
                   "val_ece_before": calibrate.expected_calibration_error(final_val, val_images.labels),
                   "val_ece_after": calibrate.expected_calibration_error(calibrate.scale(final_val, temperature), val_images.labels)}
    if config.calibrate:
        calibrate.fold_into_classifier(classifier, temperature)
        echo(f"temperature {temperature:.2f} folded into the classifier: validation ECE "
             f"{calibration['val_ece_before']:.3f} -> {calibration['val_ece_after']:.3f}")

    # One model, raw RGB in, softmax out: the backbone (now holding the tuned top units) + the head.
    with strategy.scope():
        backbone.trainable = False
        image = keras.Input((spec.input_size, spec.input_size, 3), name="image")
        model = keras.Model(image, classifier(dropout(backbone(image))), name="nebula_classifier")
    model.save(out / runfiles.MODEL_NAME)
    runfiles.write_labels(out / runfiles.LABELS_NAME, labels)
    runfiles.write_json(out / runfiles.PREPROCESS_NAME, spec.to_dict())
    extra = {"feature_dim": int(features_train.shape[-1]), "cut_layer": cut, "strategy": type(strategy).__name__,
             "replicas": strategy.num_replicas_in_sync, "snapped_kernels": snapped,
             "int8_grid_max_offset": int8_grid.max_offset(backbone)}
    config_record = _config_record(config, data_dir, out, labels, spec, splits, train_images.skipped + val_images.skipped, extra)
    runfiles.write_json(out / runfiles.CONFIG_NAME, config_record)
    runfiles.write_json(out / runfiles.HISTORY_NAME, history)

    # The test split, once, through the device's preprocessing.
    t = time.perf_counter()
    test = _evaluate_split(model, labels, spec, data_dir, splits["test"], config.batch_size, warn)
    wall["test_s"] = time.perf_counter() - t
    wall["total_s"] = time.perf_counter() - t_start
    metrics = {
        "split": "test",
        "images": len(test.paths),
        **test.scores,
        "validation": validation,
        "calibration": calibration,
        "wall_time_s": {k: round(v, 1) for k, v in wall.items()},
        "skipped_test_images": [str(e) for e in test.skipped],
    }
    runfiles.write_json(out / runfiles.METRICS_NAME, metrics)
    report.curves_png(history, out / runfiles.CURVES_PNG)
    if test.paths:
        report.confusion_png(test.scores, out / runfiles.CONFUSION_PNG, title="Test split")
    report.mistakes_html(test, out / runfiles.MISTAKES_HTML, title=f"Worst mistakes on the test split of {out.name}")
    return TrainResult(out, labels, test, metrics)


def _config_record(config, data_dir, out, labels, spec, splits, skipped, extra) -> dict:
    """The resolved configuration for config.json: flags, where the data was, versions, label counts per split."""
    import keras
    import tensorflow as tf

    return {
        **asdict(config),
        "data_dir": str(data_dir),
        "out": str(out.resolve()),
        "run_name": out.name,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "labels": labels,
        "input_size": spec.input_size,
        **extra,
        "label_counts": {s: dict(sorted(label_counts(splits[s]).items())) for s in ("train", "val", "test")},
        "skipped_images": [str(e) for e in skipped],
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": sys.version.split()[0]},
        "cpu_count": os.cpu_count(),
    }


def fine_tune_top(backbone, cut: int, dropout, classifier, cached_train, y_train, weights, cached_val, val_truth, labels,
                  config, seed: int, start: tuple[float, float] | None, echo, history: list, strategy=None):
    """Phase 2: the backbone's units above `cut` and the head, trained together on the frozen bottom's cached output.

    `start` is the head's validation (macro-F1, accuracy), scored here when None: the phase keeps
    its best epoch only if it beats that. `config` (a TrainConfig or a CrossvalConfig) gives
    unfreeze, finetune_lr, epochs, patience, batch_size and snap_weights; with snap_weights the
    tuned units are rounded back onto the int8 grid and validation is scored again.
    Returns (the model: cached bottom output -> probabilities, its best validation score, the score
    after snapping or None). `nebula train` and `nebula crossval --unfreeze` both train through here.
    """
    import contextlib

    import keras

    from nebula.train import backbones, int8_grid

    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        backbones.unfreeze_top(backbone, config.unfreeze)
        top_input = keras.Input(cached_train.shape[1:])
        top = keras.Model(top_input, classifier(dropout(through(backbone.layers[cut:], top_input))), name="top_and_head")
        top.compile(optimizer=keras.optimizers.Adam(config.finetune_lr), loss="sparse_categorical_crossentropy")
    if start is None:
        start = macro_f1_and_accuracy(top.predict(cached_val, batch_size=config.batch_size, verbose=0), val_truth, labels)
    data = training_pipeline(cached_train, y_train, weights, config.batch_size, seed)
    best = fit_with_early_stopping("phase 2 (fine-tune)", top, data, cached_val, val_truth, labels, config.epochs,
                                   config.patience, config.batch_size, echo, history,
                                   best=(start[0], start[1], top.get_weights()), strategy=strategy)
    snapped = None
    if config.snap_weights:  # fine-tuning moved the top units off the grid; round them back and score again
        int8_grid.snap(backbone)
        snapped = macro_f1_and_accuracy(top.predict(cached_val, batch_size=config.batch_size, verbose=0), val_truth, labels)
        echo(f"fine-tuned units rounded to the int8 grid: val acc {snapped[1]:.3f}  val macro-F1 {snapped[0]:.3f}")
    return top, best, snapped


def frozen_cut(backbone, unfreeze: int) -> int:
    """How many of backbone.layers stay frozen below the top `unfreeze` units: layers[:cut] are run once and cached."""
    from nebula.train import backbones

    units = len(backbones.trainable_units(backbone))
    if unfreeze > units:
        raise ValueError(f"--unfreeze {unfreeze}: backbone {backbone.name} has only {units} units")
    return len(backbone.layers) - 1 - unfreeze if unfreeze else len(backbone.layers)  # - 1: the pool layer above the units


def through(layers, x):
    """`x` run through `layers` in order (units of the backbone, shared, not copied)."""
    for layer in layers:
        x = layer(x)
    return x


def chain(layers, inputs, name):
    """A functional model that runs `layers` in order (units of the backbone, shared, not copied)."""
    import keras

    return keras.Model(inputs, through(layers, inputs), name=name)


def predict_with_progress(model, dataset, total: int, batch_size: int, desc: str) -> np.ndarray:
    import keras
    from tqdm import tqdm

    parts = []
    with tqdm(total=total, desc=desc, unit="view", leave=False) as bar:
        for batch in dataset:
            parts.append(keras.ops.convert_to_numpy(model(batch, training=False)))
            bar.update(int(batch.shape[0]))
    return np.concatenate(parts)


def _evaluate_split(model, labels, spec, data_dir, rows, batch_size, warn) -> Evaluation:
    skipped: list = []
    paths = [data_dir / r.file for r in rows]
    probs = predict_keras(model, paths, spec, batch_size, skipped)
    for err in skipped:
        warn(f"skipped {err}")
    keep = ~np.isnan(probs).any(axis=1)
    truth = [r.label for r, k in zip(rows, keep) if k]
    probs = probs[keep]
    predicted = [labels[i] for i in probs.argmax(1)]
    return Evaluation(labels, spec, [p for p, k in zip(paths, keep) if k], truth, probs, score(truth, predicted, labels), skipped)


def _save_augment_samples(decoded: DecodedImages, spec: PreprocessSpec, config: TrainConfig, path: Path, columns: int = 8) -> None:
    """One row per label (its first training image): the plain view, then augmented views as training makes them."""
    firsts: dict[int, int] = {}
    for i, label in enumerate(decoded.labels):
        firsts.setdefault(int(label), i)
    rows = []
    for label, i in sorted(firsts.items()):
        augmenter = RECIPES[config.augment]
        views = [decoded.prepared[i]] + [augmenter(decoded.reduced[i], spec, view_rng(config.seed, decoded.rows[i].file, v))
                                         for v in range(1, columns)]
        rows.append((f"{decoded.rows[i].label}: {Path(decoded.rows[i].file).name}", views))
    save_grid(rows, path)


def summary(result: TrainResult) -> str:
    """What `nebula train` prints at the end: the test table, wall times and where things are."""
    m = result.metrics
    times = ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in m["wall_time_s"].items())
    return (
        f"Test split ({m['images']} images, never used for any choice):\n{format_scores(result.test.scores)}\n"
        f"validation macro-F1 {m['validation']['final']['macro_f1']:.3f}; wall time: {times}\n"
        f"Wrote {result.run_dir}/ (model.keras, labels.txt, preprocess.json, split.csv, config.json, metrics.json, "
        f"confusion_matrix.png, training_curves.png, augment_samples.png, mistakes.html)"
    )
