"""normalize="sky": background neutralisation and one-gain stretch, the same on the device and in training."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import sky_image
from nebula.cli import cli
from nebula.device import modelfile
from nebula.device.preprocess import PreprocessSpec, normalize, prepare
from nebula.device.runtime import Classifier
from nebula.train import augment

SKY = PreprocessSpec(input_size=64, normalize="sky")
PLAIN = PreprocessSpec(input_size=64)


def _cast(image: np.ndarray, gain: float, offset) -> np.ndarray:
    """The same sky through other processing: an exposure (one gain) and light pollution (an offset per channel)."""
    return np.clip(np.rint(image * gain + np.array(offset)), 0, 255).astype(np.uint8)


def _lit_sky(size=96, seed=4, label="emission") -> np.ndarray:
    """A generated sky whose background is lifted to a grey-green 40, as a light-polluted sky is."""
    return _cast(sky_image(label, size, seed), 1.0, (40, 45, 35))


def _mean_abs(a, b) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def test_colour_cast_and_exposure_are_taken_out():
    a = _lit_sky()
    b = _cast(a, 0.6, (25, 12, 2))  # darker exposure, a warm light-pollution cast
    before, after = _mean_abs(prepare(a, PLAIN), prepare(b, PLAIN)), _mean_abs(prepare(a, SKY), prepare(b, SKY))
    assert before > 10 and after < 2.5  # 12 levels apart on average before, nearly the same after


def test_background_alone_takes_out_the_cast_and_keeps_the_exposure():
    spec = PreprocessSpec(input_size=64, normalize="background")
    a = _lit_sky()
    b = _cast(a, 1.0, (25, 12, 2))
    assert _mean_abs(prepare(a, spec), prepare(b, spec)) < 1.5
    assert prepare(a, spec).max() <= 255 - 30  # the stars (255) lose the sky's 40 and are not stretched back


def test_the_sky_goes_neutral_and_a_red_nebula_stays_red():
    out = prepare(_cast(sky_image("emission", 96, seed=4), 1.0, (10, 40, 25)), SKY).astype(int)
    corner = out[:12, :12].reshape(-1, 3)
    assert np.abs(np.median(corner, axis=0)).max() <= 6  # the green cast is gone: the sky is about black
    r, g, b = out.reshape(-1, 3)[np.argsort(out[..., 0].ravel())[-50]]  # in the glow, clear of the stars
    assert r > 2 * g and r > 2 * b  # one gain for all channels: red stays red
    assert out[..., 0].max() == 255  # and it is stretched to full scale


def test_padding_never_enters_the_statistics():
    wide = _lit_sky(96)[:40]  # 96 x 40: "fit" pads above and below with black
    out = prepare(wide, SKY)
    top = (64 - round(40 * 64 / 96)) // 2
    assert not out[:top].any() and not out[-top:].any()  # the padding stays black
    # Had the black padding counted, the 5th percentile would be 0 and the lifted sky (40) would be stretched with
    # the rest, to well over 100; its own 5th percentile takes it to black, noise stretched a little above.
    assert np.median(out[top + 2 : top + 6, :10].reshape(-1, 3), axis=0).max() <= 15


def test_a_spec_without_the_field_reads_as_none_and_prepare_is_unchanged():
    old = {"input_size": 64, "resize_mode": "fit", "interpolation": "bilinear", "color_order": "RGB", "pad_value": 0,
           "mean": 127.0, "std": 128.0}
    spec = PreprocessSpec.from_dict(old)
    assert spec.normalize == "none" and spec == PLAIN
    assert PreprocessSpec.from_dict(json.loads(json.dumps(SKY.to_dict()))) == SKY
    image = _lit_sky(96)[:40]
    # What prepare did before the field existed: resize, then pad with black (fit) or crop (center_crop).
    resized = np.asarray(Image.fromarray(image).resize((64, 27), Image.BILINEAR))
    expected = np.zeros((64, 64, 3), np.uint8)
    expected[18:45] = resized
    assert np.array_equal(prepare(image, spec), expected)
    cropped = np.asarray(Image.fromarray(image).resize((154, 64), Image.BILINEAR).crop((45, 0, 109, 64)))
    assert np.array_equal(prepare(image, PreprocessSpec(input_size=64, resize_mode="center_crop")), cropped)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="normalize must be one of"):
        PreprocessSpec(normalize="auto")


class _NoChange:
    """A generator that picks the identity: the whole frame, no rotation, no flip."""

    def uniform(self, low, high, size=None):
        return high if high == augment.CROP_FRACTION[1] else low

    def integers(self, low, high=None, size=None):
        return 0

    def random(self):
        return 0.99


def test_training_view_without_change_is_the_device_input():
    wide = _lit_sky(96)[:40]
    view, content = augment._geometry(wide, SKY, _NoChange())
    assert np.array_equal(normalize(view, SKY, content), prepare(wide, SKY))
    assert normalize(view, PLAIN, content) is view  # "none" changes nothing


@pytest.mark.parametrize("recipe", sorted(augment.RECIPES))
def test_augmented_views_are_normalised_after_their_photometry(recipe):
    image = _lit_sky(96)
    for v in range(6):
        rng = np.random.default_rng(v)
        out = augment.RECIPES[recipe](image, SKY, rng)
        _, content = augment._geometry(image, SKY, np.random.default_rng(v))  # the same draws: the same mask
        assert not out[~content].any()  # corners the rotation uncovered are black, like the device's padding
        assert np.percentile(out[content], SKY.background_percentile, axis=0).max() <= 1  # the sky at black
        assert out[content].max() >= 250  # stretched to full scale, whatever exposure the augmentation drew


def _old_augment(image, spec, rng):
    """augment() as it was before normalisation existed (the rotation mask must add no random draws)."""
    picture = Image.fromarray(image)
    picture = augment._random_crop(picture, rng)
    angle = float(rng.uniform(0.0, 360.0))
    picture = picture.rotate(angle, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    if rng.random() < 0.5:
        picture = picture.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        picture = picture.transpose(Image.FLIP_TOP_BOTTOM)
    return augment.photometric(prepare(picture, spec), rng)


def test_none_keeps_the_old_augmentation():
    image = _lit_sky(96)
    for v in range(4):
        assert np.array_equal(augment.augment(image, PLAIN, np.random.default_rng(v)),
                              _old_augment(image, PLAIN, np.random.default_rng(v)))


def test_train_convert_classify_carry_the_normalisation(tmp_path, sky_folder):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--data", str(sky_folder), "--out", str(run), "--backbone", "tiny",
                                      "--epochs", "3", "--unfreeze", "0", "--seed", "1", "--normalize", "sky"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "preprocess.json").read_text())["normalize"] == "sky"
    assert json.loads((run / "config.json").read_text())["normalize"] == "sky"
    out = tmp_path / "nebula.tflite"
    result = CliRunner().invoke(cli, ["convert", str(run), "--out", str(out), "--representative", "20", "--force"])
    assert result.exit_code == 0, result.output
    assert modelfile.read(out).manifest["preprocess"]["normalize"] == "sky"
    # nebula classify answers as the model does on the input normalised by hand.
    photo = _cast(sky_image("emission", 80, seed=3), 0.7, (30, 40, 10))
    Image.fromarray(photo).save(tmp_path / "photo.png")
    result = CliRunner().invoke(cli, ["classify", str(tmp_path / "photo.png"), "--model", str(out), "--format", "jsonl",
                                      "--top-k", "3"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output.splitlines()[0])
    by_hand = prepare(photo, PreprocessSpec(input_size=32, normalize="sky"))
    assert not np.array_equal(by_hand, prepare(photo, PreprocessSpec(input_size=32)))
    classifier = Classifier(out)
    assert classifier.spec.normalize == "sky"
    # (not also "the answer on the unnormalised input differs": a tiny model's uint8 scores often tie)
    expected = classifier.classify_prepared(by_hand, top_k=3)
    assert [label for label, _ in answer["top_k"]] == [label for label, _ in expected.top_k]
    assert [score for _, score in answer["top_k"]] == pytest.approx([score for _, score in expected.top_k], abs=1e-4)
