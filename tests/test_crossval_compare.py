"""Pairing two crossval runs: the vectorised macro-F1 is the scorer's, and the bootstrap tells a real gain from none."""

import random

import numpy as np
import pytest

from nebula.device.scoring import score
from nebula.train.crossval_compare import CompareError, compare, load_record, macro_f1_weighted

LABELS = ["dark", "emission", "reflection", "other"]


def _random_answers(n, seed):
    rng = random.Random(seed)
    truth = [rng.choice(LABELS[:3]) for _ in range(n)]  # 'other' is never true, sometimes predicted
    predicted = [rng.choice(LABELS) for _ in range(n)]
    return truth, predicted


def _indices(values):
    return np.array([LABELS.index(v) for v in values])


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_macro_f1_is_the_scorers_and_weights_count_photos_twice(seed):
    truth, predicted = _random_answers(40, seed)
    ones = np.ones((1, 40))
    got = macro_f1_weighted(_indices(truth), _indices(predicted), len(LABELS), ones)[0]
    assert got == pytest.approx(score(truth, predicted, LABELS)["macro_f1"], abs=1e-12)
    weights = np.array([[2.0 if i % 3 == 0 else (0.0 if i % 3 == 1 else 1.0) for i in range(40)]])
    doubled = [i for i in range(40) for _ in range(int(weights[0, i]))]
    expected = score([truth[i] for i in doubled], [predicted[i] for i in doubled], LABELS)["macro_f1"]
    assert macro_f1_weighted(_indices(truth), _indices(predicted), len(LABELS), weights)[0] == pytest.approx(expected, abs=1e-12)


def _record(truth, predicted_per_repeat, photographers, **config):
    return {"config": {"folds": 5, "seed": 0, "repeats": len(predicted_per_repeat), **config}, "labels": LABELS,
            "out_of_fold": {"files": [f"f{i}.png" for i in range(len(truth))], "photographers": photographers,
                            "truth": truth, "predicted": predicted_per_repeat}}


def test_a_perfect_recipe_beats_a_random_one_in_every_draw_and_a_recipe_ties_with_itself():
    truth, noisy = _random_answers(120, 1)
    owners = [f"p{i % 30}" for i in range(120)]
    random_run = _record(truth, [noisy, _random_answers(120, 2)[1]], owners)
    perfect_run = _record(truth, [truth, truth], owners)
    result = compare(random_run, perfect_run, resamples=300)
    assert result["photographers"] == 30 and result["photographs"] == 120
    assert all(d > 0.5 for d in result["macro_f1"]["difference_per_repeat"])
    assert result["bootstrap"]["b_ahead"] == 1.0 and result["bootstrap"]["interval_95"][0] > 0.4
    same = compare(random_run, random_run, resamples=300)
    assert same["macro_f1"]["difference_mean"] == 0 and same["bootstrap"]["b_ahead"] == 0.0
    assert same["bootstrap"]["interval_95"] == [0.0, 0.0]


def test_runs_that_cannot_be_paired_are_refused_in_one_line(tmp_path):
    truth, predicted = _random_answers(20, 3)
    owners = [f"p{i % 5}" for i in range(20)]
    base = _record(truth, [predicted], owners)
    with pytest.raises(CompareError, match="differ in folds"):
        compare(base, _record(truth, [predicted], owners, folds=3))
    with pytest.raises(CompareError, match="different photographs"):
        compare(base, _record(list(reversed(truth)), [predicted], owners))
    old = tmp_path / "old"
    old.mkdir()
    (old / "crossval.json").write_text('{"config": {}}')
    with pytest.raises(CompareError, match="no out_of_fold answers"):
        load_record(old)
    with pytest.raises(CompareError, match="cannot read"):
        load_record(tmp_path / "missing.json")
