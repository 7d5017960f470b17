"""The logistic head: its gradient is the loss's, its answer drops into a Dense layer, and the penalty shrinks it."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_sky_folder
from nebula.cli import cli
from nebula.train import linear_head
from nebula.train.calibrate import softmax
from nebula.train.run import load_run


def _blobs(seed=0, n=60, d=5, classes=3, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, d))
    y = rng.integers(0, classes, n)
    return centres[y] + rng.normal(0, spread, (n, d)) + 10.0, y  # +10: an offset the centring must fold into the bias


def test_gradient_matches_finite_differences():
    x, y = _blobs(n=20, d=4)
    w = np.random.default_rng(1).uniform(0.5, 2.0, len(y))
    theta = np.random.default_rng(2).normal(0, 0.1, 4 * 3 + 3)
    _, gradient = linear_head.loss_and_gradient(theta.copy(), x, y, w, 3, 0.01)
    step = 1e-6
    numeric = np.array([(linear_head.loss_and_gradient(theta + step * e, x, y, w, 3, 0.01)[0]
                         - linear_head.loss_and_gradient(theta - step * e, x, y, w, 3, 0.01)[0]) / (2 * step)
                        for e in np.eye(len(theta))])
    np.testing.assert_allclose(gradient, numeric, rtol=1e-4, atol=1e-7)


def test_fit_drops_into_a_dense_layer_and_separates_separable_data():
    import keras

    x, y = _blobs(spread=0.3)
    kernel, bias = linear_head.fit(x, y, None, 3, l2=1e-4)
    assert kernel.shape == (5, 3) and bias.shape == (3,) and kernel.dtype == np.float32
    dense = keras.layers.Dense(3, activation="softmax")
    dense.build((None, 5))
    dense.set_weights([kernel, bias])
    probs = np.asarray(dense(x.astype(np.float32)))
    np.testing.assert_allclose(probs, softmax(x @ kernel + bias), atol=1e-5)  # the centring is in the bias
    assert (probs.argmax(1) == y).all()


def test_a_larger_penalty_shrinks_the_kernel_and_weights_count():
    x, y = _blobs(spread=2.0)
    norms = [np.linalg.norm(linear_head.fit(x, y, None, 3, l2=l2)[0]) for l2 in (1e-4, 1e-2, 1.0)]
    assert norms[0] > norms[1] > norms[2]
    # weighting class 0 heavily moves answers towards it
    weights = np.where(y == 0, 20.0, 1.0)
    plain, weighted = (softmax(x @ k + b)[:, 0].mean()
                       for k, b in (linear_head.fit(x, y, None, 3, 0.1), linear_head.fit(x, y, weights, 3, 0.1)))
    assert weighted > plain


def test_mismatched_inputs_are_one_clear_line():
    x, y = _blobs()
    with pytest.raises(ValueError, match="60 feature rows, 59 labels"):
        linear_head.fit(x, y[:-1], None, 3)
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        linear_head.fit(x, y, None, 2)


def test_train_with_the_logistic_head_scores_validation_as_it_says(tmp_path):
    """Head only on the tiny backbone: the solved head is in the saved model, and validation reads as training logged."""
    import keras

    from nebula.train.evaluate import predict_keras, score

    data = write_sky_folder(tmp_path / "sky", per_label=10)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(out), "--backbone", "tiny",
                                      "--unfreeze", "0", "--views", "4", "--head", "logistic", "--no-calibrate"])
    assert result.exit_code == 0, result.output
    assert "phase 1 (head) logistic, L2 0.001" in result.output
    run = load_run(out)
    assert run.config["head"] == "logistic"
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert len(history["phase 1: head"]) == 1
    model = keras.saving.load_model(run.model_path, compile=False)
    probs = predict_keras(model, run.image_paths("val"), run.spec, batch_size=4)
    val = score([r.label for r in run.splits["val"]], [run.labels[i] for i in probs.argmax(1)], run.labels)
    assert val["macro_f1"] == pytest.approx(metrics["validation"]["final"]["macro_f1"])
    assert val["macro_f1"] >= 0.8  # red, blue and white skies: colour alone tells them apart


def test_an_unknown_head_is_refused(tmp_path):
    data = write_sky_folder(tmp_path / "sky", per_label=4)
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--head", "forest"])
    assert result.exit_code == 2 and "forest" in result.output


def test_library_callers_get_one_line_for_an_unknown_head(tmp_path):
    from nebula.train.crossval import CrossvalConfig, CrossvalError, crossval
    from nebula.train.fit import TrainConfig, TrainingError, train

    with pytest.raises(TrainingError, match="--head forest: not one of dense, logistic"):
        train(TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), head="forest"))
    with pytest.raises(CrossvalError, match="head 'forest' is not one of dense, logistic"):
        crossval(CrossvalConfig(data=str(tmp_path), out=str(tmp_path / "cv"), head="forest"))
