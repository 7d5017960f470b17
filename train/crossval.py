"""Leave-photographers-out cross-validation: how a recipe does on pictures by people it never learned from.

    nebula crossval --data data/stellarium --out models/crossval/lite0

Stellarium's photographs come from about 110 photographers and surveys (the
`credit` column). The photographers are dealt into `folds` folds of about equal
size; for each fold the head is trained on everyone else and scored on that
fold's photographs. A training image is also left out when its object group is
in the held-out fold (the same nebula by another photographer), so a score
never rewards remembering an object. Every photograph is scored exactly once,
by a model that saw neither its photographer nor its object: the pooled
macro-F1 and per-label recall are the figure to choose recipes by (data, crops,
augmentation, backbone), not the object-split test of `nebula train`.

Speed: by default the backbone is frozen (head only, as `nebula train --unfreeze 0`), so
the features of every view of every image are computed once and each fold trains in
seconds (the head: Adam-trained, or solved with --head logistic, linear_head.py).
`--unfreeze N` scores what `nebula train` (and so `make`) does: the output of the frozen
bottom is computed once, and each fold fine-tunes the top N units from the ImageNet
weights on it, as phase 2 of fit.py does, then rounds them onto the int8 grid.
Crops (origin "crop") train only; scores are on whole photographs.
Each fold fits a temperature on its own validation images (calibrate.py), and the
expected calibration error is reported before and after.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from nebula.train import calibrate, linear_head
from nebula.train.efficientnet_lite import cache_dir
from nebula.train.evaluate import format_scores, score
from nebula.train.manifest import ManifestRow, grouped_split, load_dataset

DARK_VS_EMISSION = ("dark", "emission")
CROSSVAL_NAME = "crossval.json"
FEATURE_CACHE = cache_dir() / "features"  # beside the backbone weights: $XDG_CACHE_HOME, else ~/.cache


class CrossvalError(ValueError):
    """A dataset that cannot be cross-validated as asked; the message is one line saying why."""


@dataclass
class CrossvalConfig:
    data: str
    out: str
    backbone: str = "efficientnet_lite0"
    weights: str = "pretrained"
    folds: int = 5
    views: int = 4
    augment: str = "shifted"
    normalize: str = "none"  # per-image normalisation in the spec: nebula.device.preprocess.NORMALIZE_MODES
    crops: bool = True
    seed: int = 0
    batch_size: int = 32
    head: str = "dense"  # linear_head.HEADS: how the head is fitted
    head_l2: float = linear_head.DEFAULT_L2  # the logistic head's L2 penalty
    head_lr: float = 1e-3  # the dense head's Adam learning rate
    head_epochs: int = 40
    patience: int = 4
    dropout: float = 0.3
    snap_weights: bool = True
    class_balance: float = 0.5  # power of the inverse-frequency class weights (dataset.class_weights)
    repeats: int = 1  # passes with other fold deals and head seeds, for the spread
    unfreeze: int = 0  # top backbone units fine-tuned per fold after the head (nebula train's phase 2); 0 = head only
    finetune_lr: float = 1e-4
    epochs: int = 12  # most fine-tuning epochs per fold


def photographer(row: ManifestRow) -> str:
    """The credit without its link: 'Plover Hill Observatory <http://...>' -> 'Plover Hill Observatory'."""
    return row.credit.split(" <", 1)[0].strip() or "(no credit)"


def assign_folds(photos: list[ManifestRow], folds: int, seed: int = 0) -> dict[str, int]:
    """photographer -> fold: the largest first, each to the fold with the fewest photographs so far."""
    counts = Counter(photographer(r) for r in photos)
    names = sorted(counts)
    random.Random(seed).shuffle(names)  # ties between equal counts broken by the seed, not by the alphabet
    names.sort(key=lambda n: -counts[n])
    sizes = [0] * folds
    fold_of = {}
    for name in names:
        k = min(range(folds), key=lambda i: (sizes[i], i))
        fold_of[name] = k
        sizes[k] += counts[name]
    return fold_of


def fold_rows(rows: list[ManifestRow], fold_of: dict[str, int], k: int) -> tuple[list[int], list[int]]:
    """(train indices, test indices) of fold k: test = its photographers' photographs; train = the rest,
    less anything of the same photographer or of an object group that is in the test fold."""
    test = [i for i, r in enumerate(rows) if r.origin != "crop" and fold_of.get(photographer(r)) == k]
    test_groups = {rows[i].group for i in test}
    train = [i for i, r in enumerate(rows)
             if fold_of.get(photographer(r), -1) != k and r.group not in test_groups]
    return train, test


def dark_vs_emission(truth: list[str], probs: np.ndarray, labels: list[str]) -> dict:
    """The origin project's task: of the dark and emission photographs, how many are told apart (argmax of the two)."""
    if not all(label in labels for label in DARK_VS_EMISSION):
        return {"accuracy": None, "images": 0}
    cols = [labels.index(label) for label in DARK_VS_EMISSION]
    keep = [i for i, t in enumerate(truth) if t in DARK_VS_EMISSION]
    if not keep:
        return {"accuracy": None, "images": 0}
    picked = [DARK_VS_EMISSION[j] for j in probs[keep][:, cols].argmax(1)]
    return {"accuracy": float(np.mean([p == truth[i] for p, i in zip(picked, keep)])), "images": len(keep)}


def crossval(config: CrossvalConfig, echo: Callable[[str], None] = print) -> dict:
    """Run the cross-validation and write crossval.json (+ confusion PNG) into config.out; returns the record."""
    import keras

    from nebula.train import backbones, report, run as runfiles
    from nebula.train.fit import make_deterministic, ordered_labels

    if config.head not in linear_head.HEADS:
        raise CrossvalError(f"head {config.head!r} is not one of {', '.join(linear_head.HEADS)}")
    t_start = time.perf_counter()
    data_dir, out = Path(config.data).resolve(), Path(config.out)
    rows = [r for r in load_dataset(data_dir) if config.crops or r.origin != "crop"]
    labels = ordered_labels(rows)
    make_deterministic(config.seed)
    backbone_info = backbones.get(config.backbone)
    spec = replace(backbone_info.preprocess, normalize=config.normalize)
    photos = [r for r in rows if r.origin != "crop"]
    echo(f"{len(photos)} photographs by {len({photographer(r) for r in photos})} photographers in {config.folds} folds, "
         f"{len(rows) - len(photos)} crops (train only); backbone {config.backbone}, augment {config.augment}, "
         f"normalize {config.normalize}, head {config.head}, {_tuned(config.unfreeze)}")

    rows, views = _view_features(rows, data_dir, spec, labels, config, echo)
    top = None
    if config.unfreeze:  # views holds the frozen bottom's output; the top units pool it into the head's features
        top = _FineTunableTop(config, views.shape[2:])
        maps, views = views, top.pooled(views)
    index = {label: i for i, label in enumerate(labels)}
    truth_index = np.array([index[r.label] for r in rows], dtype=np.int32)

    passes = []
    for repeat in range(config.repeats):
        keras.utils.set_random_seed(config.seed + repeat)
        fold_of = assign_folds(photos, config.folds, config.seed + repeat)
        passes.append(_one_pass(rows, views, truth_index, labels, fold_of, config, repeat, echo,
                                top and (top, maps)))
    # every photograph's answer in every repeat, so two recipes can be compared photo by photo (crossval_compare.py)
    by_file = {r.file: r for r in rows}
    files = passes[0].pop("scored_files")
    out_of_fold = {"files": files, "photographers": [photographer(by_file[f]) for f in files],
                   "truth": passes[0].pop("scored_truth"), "predicted": [p.pop("scored_predicted") for p in passes]}
    for p in passes[1:]:  # every repeat scores every photograph, in the rows' order
        assert p.pop("scored_files") == files and p.pop("scored_truth") == out_of_fold["truth"]
    record = {
        "config": asdict(config),
        "labels": labels,
        "photographs": passes[0]["photographs"],
        "photographers": len(fold_of),
        "crops_used": sum(r.origin == "crop" for r in rows),
        **{k: v for k, v in passes[0].items() if k != "photographs"},
        "repeats": _spread(passes, labels),
        "out_of_fold": out_of_fold,
        "wall_time_s": round(time.perf_counter() - t_start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    runfiles.write_json(out / CROSSVAL_NAME, record)
    report.confusion_png(record, out / "crossval_confusion.png", title=f"Leave-photographers-out ({config.folds} folds)")
    return record


def _one_pass(rows, views, truth_index, labels, fold_of, config: CrossvalConfig, repeat: int, echo,
              finetune: tuple | None = None) -> dict:
    """Every photograph scored once by a head that saw neither its photographer nor its object: pooled scores.

    finetune: (_FineTunableTop, the bottom's output per view) when --unfreeze > 0; the head is then
    fine-tuned with the top units on each fold, and scores come from that model.
    """
    import keras

    from nebula.train.dataset import class_weights, training_pipeline
    from nebula.train.fit import fit_with_early_stopping

    oof = np.full((len(rows), len(labels)), np.nan, np.float32)
    oof_calibrated = oof.copy()
    per_fold = []
    for k in range(config.folds):
        train_idx, test_idx = fold_rows(rows, fold_of, k)
        train_rows = [rows[i] for i in train_idx]
        inner = grouped_split([r for r in train_rows if r.origin != "crop"], val=0.15, test=0.0, seed=config.seed + repeat + k)
        val_groups = {r.group for r in inner["val"]}
        val_idx = [i for i in train_idx if rows[i].origin != "crop" and rows[i].group in val_groups]
        fit_idx = [i for i in train_idx if rows[i].group not in val_groups]
        if not val_idx or not fit_idx or not test_idx:
            raise CrossvalError(f"fold {k + 1} of {config.folds} leaves {len(fit_idx)} training, {len(val_idx)} validation "
                                f"and {len(test_idx)} test images: too few photographers or object groups for "
                                f"{config.folds} folds (try fewer --folds)")
        x = views[fit_idx].reshape(len(fit_idx) * config.views, -1)
        y = np.repeat(truth_index[fit_idx], config.views)
        weights = class_weights(y, len(labels), config.class_balance)[y]
        head_input = keras.Input((x.shape[1],))
        classifier = keras.layers.Dense(len(labels), activation="softmax")
        head = keras.Model(head_input, classifier(keras.layers.Dropout(config.dropout)(head_input)))
        if config.head == "logistic":
            classifier.set_weights(list(linear_head.fit(x, y, weights, len(labels), config.head_l2)))
        else:
            head.compile(optimizer=keras.optimizers.Adam(config.head_lr), loss="sparse_categorical_crossentropy")
            fit_with_early_stopping(f"fold {k + 1}/{config.folds}", head,
                                    training_pipeline(x, y, weights, config.batch_size, config.seed + repeat + k),
                                    views[val_idx, 0], truth_index[val_idx], labels, config.head_epochs, config.patience,
                                    config.batch_size, lambda line: None, [])
        model, inputs = head, views
        if finetune:
            top, maps = finetune
            model = top.fine_tune(classifier, maps, fit_idx, val_idx, y, weights, truth_index, labels, repeat + k)
            inputs = maps
        val_probs = model.predict(inputs[val_idx, 0], batch_size=config.batch_size, verbose=0)
        temperature = calibrate.fit_temperature(val_probs, truth_index[val_idx])
        probs = model.predict(inputs[test_idx, 0], batch_size=config.batch_size, verbose=0)
        oof[test_idx] = probs
        oof_calibrated[test_idx] = calibrate.scale(probs, temperature)
        fold_truth = [labels[i] for i in truth_index[test_idx]]
        fold_score = score(fold_truth, [labels[i] for i in probs.argmax(1)], labels)
        per_fold.append({"fold": k + 1, "photographers": sorted(n for n, f in fold_of.items() if f == k),
                         "test_images": len(test_idx), "train_images": len(fit_idx), "val_images": len(val_idx),
                         "temperature": temperature, "macro_f1": fold_score["macro_f1"], "accuracy": fold_score["accuracy"]})
        echo(f"repeat {repeat + 1}, fold {k + 1}/{config.folds}: {len(test_idx)} test photos, train {len(fit_idx)} "
             f"(+{len(val_idx)} val), macro-F1 {fold_score['macro_f1']:.3f}, accuracy {fold_score['accuracy']:.3f}, "
             f"T {temperature:.2f}")
    scored = [i for i, r in enumerate(rows) if r.origin != "crop" and not np.isnan(oof[i]).any()]
    truth = [labels[truth_index[i]] for i in scored]
    probs, probs_cal = oof[scored], oof_calibrated[scored]
    y = truth_index[scored]
    return {
        "photographs": len(scored),
        **score(truth, [labels[i] for i in probs.argmax(1)], labels),
        "dark_vs_emission": dark_vs_emission(truth, probs, labels),
        "calibration": {"ece_before": calibrate.expected_calibration_error(probs, y),
                        "ece_after": calibrate.expected_calibration_error(probs_cal, y),
                        "nll_before": calibrate.nll(probs, y), "nll_after": calibrate.nll(probs_cal, y)},
        "folds": per_fold,
        "scored_files": [rows[i].file for i in scored],
        "scored_truth": truth,
        "scored_predicted": [labels[i] for i in probs.argmax(1)],
    }


class _FineTunableTop:
    """The backbone's top `unfreeze` units, reset to the same (int8-snapped ImageNet) weights before every fold."""

    def __init__(self, config: CrossvalConfig, map_shape: tuple):
        import keras

        from nebula.train import backbones, int8_grid
        from nebula.train.fit import chain

        self.config = config
        self.backbone = backbones.create(config.backbone, config.weights)
        if config.snap_weights:
            int8_grid.snap(self.backbone)
        self.cut = bottom_cut(self.backbone, config.unfreeze)
        self.layers = self.backbone.layers[self.cut:]
        self.initial = [layer.get_weights() for layer in self.layers]
        self.backbone.trainable = False
        self.frozen = chain(self.layers, keras.Input(map_shape), "top")

    def pooled(self, maps: np.ndarray) -> np.ndarray:
        """(N, views, H, W, C) bottom output -> (N, views, D) features through the untouched top."""
        flat = maps.reshape(-1, *maps.shape[2:])
        return self.frozen.predict(flat, batch_size=self.config.batch_size, verbose=0).reshape(*maps.shape[:2], -1)

    def fine_tune(self, classifier, maps, fit_idx, val_idx, y, weights, truth_index, labels, seed_offset: int):
        """Top units + the fitted head, trained on the fold's training views by fit.py's phase 2; returns the model."""
        import keras

        from nebula.train.fit import fine_tune_top

        c = self.config
        for layer, weights_before in zip(self.layers, self.initial):
            layer.set_weights(weights_before)
        model, _, _ = fine_tune_top(self.backbone, self.cut, keras.layers.Dropout(c.dropout), classifier,
                                    maps[fit_idx].reshape(-1, *maps.shape[2:]), y, weights, maps[val_idx, 0],
                                    truth_index[val_idx], labels, c, c.seed + seed_offset + 1, None, lambda line: None, [])
        self.backbone.trainable = False
        return model


def bottom_cut(backbone, unfreeze: int) -> int:
    """fit.frozen_cut, its error as crossval's one-line error."""
    from nebula.train.fit import frozen_cut

    try:
        return frozen_cut(backbone, unfreeze)
    except ValueError as err:
        raise CrossvalError(str(err)) from None


def _spread(passes: list[dict], labels: list[str]) -> dict:
    """Mean and standard deviation over repeats (other fold deals, other head seeds): how much of a difference is noise."""
    def stats(values):
        return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": [float(v) for v in values]}

    return {
        "n": len(passes),
        "macro_f1": stats([p["macro_f1"] for p in passes]),
        "accuracy": stats([p["accuracy"] for p in passes]),
        "dark_vs_emission": stats([p["dark_vs_emission"]["accuracy"] or 0.0 for p in passes]),
        "recall": {label: stats([p["per_class"][label]["recall"] for p in passes])
                   for label in labels if passes[0]["per_class"][label]["support"]},
    }


def _view_features(rows, data_dir: Path, spec, labels, config: CrossvalConfig, echo):
    """(readable rows, (N, views, D) pooled features): computed once per image and recipe, then read from a cache.

    With --unfreeze N the cache holds the output of the layers below the top N units, (N, views, H, W, C).

    The cache (nebula-classifier/features/ under $XDG_CACHE_HOME, else ~/.cache) is keyed by everything that
    changes a feature -- backbone, weights, int8 rounding, preprocessing, augmentation recipe, seed, views, and
    the source of the code that makes the views and the features -- and each image by its path, size and
    modification time, so comparing recipes pays only for what differs, and an edit to the augmentation or the
    backbone never reuses stale features.
    """
    import os
    import zipfile

    import keras

    from nebula.device import decode, preprocess
    from nebula.train import augment as augmentation, backbones, dataset, efficientnet_lite, int8_grid, unit_chain
    from nebula.train.dataset import augmented_views, decode_rows
    from nebula.train.fit import chain, predict_with_progress

    code = hashlib.sha1(b"".join(Path(m.__file__).read_bytes() for m in (
        augmentation, backbones, dataset, efficientnet_lite, int8_grid, unit_chain, decode, preprocess))).hexdigest()
    recipe = json.dumps([config.backbone, config.weights, config.snap_weights, spec.to_dict(), config.augment,
                         config.seed, config.views, code] + ([config.unfreeze] if config.unfreeze else []), sort_keys=True)
    cache_path = FEATURE_CACHE / f"{hashlib.sha1(recipe.encode()).hexdigest()[:16]}.npz"
    try:
        cached = dict(np.load(cache_path)) if cache_path.exists() else {}
    except (OSError, ValueError, zipfile.BadZipFile) as err:  # a cache cut short: start it again
        echo(f"feature cache {cache_path} unreadable ({err}); computing it again")
        cached = {}

    def image_key(row) -> str:
        try:
            stat = (data_dir / row.file).stat()
        except OSError:  # missing: decode_rows says so in one line and skips it
            return f"missing:{row.file}"
        return hashlib.sha1(f"{row.file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()

    keys = [image_key(r) for r in rows]
    missing = [r for r, k in zip(rows, keys) if k not in cached]
    if missing:
        echo(f"computing features of {len(missing)} images x {config.views} views ({len(rows) - len(missing)} cached)")
        decoded = decode_rows(missing, data_dir, spec, labels, keep_reduced=True, progress="decode", warn=echo)
        backbone = backbones.create(config.backbone, config.weights)
        if config.snap_weights:
            int8_grid.snap(backbone)
        backbone.trainable = False
        if config.unfreeze:  # the frozen bottom's output; the top units are run per fold
            cut = bottom_cut(backbone, config.unfreeze)
            backbone = chain(backbone.layers[:cut], keras.Input((spec.input_size, spec.input_size, 3)), "bottom")
        features = predict_with_progress(
            backbone, augmented_views(decoded, spec, config.views, config.seed, config.batch_size,
                                      augmentation.RECIPES[config.augment]),
            len(decoded) * config.views, config.batch_size, "views")
        features = features.reshape(len(decoded), config.views, *features.shape[1:])
        fresh = {image_key(r): f for r, f in zip(decoded.rows, features)}
        cached.update(fresh)
        FEATURE_CACHE.mkdir(parents=True, exist_ok=True)
        partial = cache_path.with_name(cache_path.stem + ".partial.npz")
        np.savez(partial, **cached)
        os.replace(partial, cache_path)  # a cut-short write never replaces a good cache
        unreadable = {r.file for r in missing} - {r.file for r in decoded.rows}
        keep = [i for i, r in enumerate(rows) if r.file not in unreadable]
        rows, keys = [rows[i] for i in keep], [keys[i] for i in keep]
    return rows, np.stack([cached[k] for k in keys])


def _tuned(unfreeze: int) -> str:
    units = f"{unfreeze} backbone unit{'s' if unfreeze > 1 else ''}"
    return f"top {units} fine-tuned per fold" if unfreeze else "head only (frozen backbone)"


def summary(record: dict) -> str:
    c = record["calibration"]
    spread = record["repeats"]
    spread_text = "" if spread["n"] < 2 else (
        f"\nover {spread['n']} repeats (other fold deals and seeds): macro-F1 {spread['macro_f1']['mean']:.3f} "
        f"+- {spread['macro_f1']['std']:.3f}, dark-vs-emission {spread['dark_vs_emission']['mean']:.3f} "
        f"+- {spread['dark_vs_emission']['std']:.3f}; recall " + ", ".join(
            f"{label} {s['mean']:.2f}" for label, s in spread["recall"].items()))
    dve = record["dark_vs_emission"]
    dve_text = f"{dve['accuracy']:.3f} on {dve['images']} photos" if dve["accuracy"] is not None else "n/a"
    return (f"Leave-photographers-out: {record['photographs']} photographs by {record['photographers']} photographers, "
            f"{record['config']['folds']} folds, {record['crops_used']} crops in training, "
            f"{_tuned(record['config'].get('unfreeze', 0))}\n"
            f"{format_scores(record)}\n"
            f"dark-vs-emission accuracy {dve_text}\n"
            f"expected calibration error {c['ece_before']:.3f} -> {c['ece_after']:.3f} with a temperature per fold; "
            f"wall time {record['wall_time_s']:.0f} s{spread_text}")
