"""PreprocessSpec as data: numeric mean/std, and preprocess.json files written before they existed."""

import json

import pytest

from nebula.device.preprocess import PreprocessSpec
from nebula.train.run import RunError, read_spec

# What `nebula train` wrote before mean/std were fields (every model of that time).
OLD_SPEC = {"input_size": 224, "resize_mode": "fit", "interpolation": "bilinear", "color_order": "RGB", "pad_value": 0,
            "normalization": "(x - 127) / 128, inside the model"}


def test_round_trip():
    spec = PreprocessSpec(input_size=240, resize_mode="center_crop", interpolation="bicubic", mean=127.5, std=127.5)
    assert PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert "normalization" not in spec.to_dict()


def test_old_file_reads_its_free_text_normalization(tmp_path):
    path = tmp_path / "preprocess.json"
    path.write_text(json.dumps(OLD_SPEC))
    spec = read_spec(path)
    assert spec == PreprocessSpec(input_size=224, resize_mode="fit", mean=127.0, std=128.0)
    assert PreprocessSpec.from_dict({**OLD_SPEC, "normalization": "(x - 127.5) / 127.5"}).mean == 127.5
    assert PreprocessSpec.from_dict({**OLD_SPEC, "normalization": "(x - 127.5) / 127.5"}).std == 127.5


def test_numeric_fields_win_over_an_old_text():
    spec = PreprocessSpec.from_dict({**OLD_SPEC, "mean": 100.0, "std": 50.0})
    assert (spec.mean, spec.std) == (100.0, 50.0)


def test_unreadable_old_normalization_is_one_clear_line(tmp_path):
    path = tmp_path / "preprocess.json"
    path.write_text(json.dumps({**OLD_SPEC, "normalization": "x / 255"}))
    with pytest.raises(RunError) as err:
        read_spec(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "'x / 255'" in message and "\n" not in message


def test_std_must_be_positive():
    with pytest.raises(ValueError, match="std must be positive"):
        PreprocessSpec(std=0.0)
