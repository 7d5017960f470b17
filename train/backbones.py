"""Backbone registry: a name maps to a constructor and the facts that travel with its weights.

Each entry carries its preprocessing as data (a `PreprocessSpec`: input size, resize mode,
interpolation, mean and std), as timm's pretrained configs do. The model's first layer is
built from that spec (`unit_chain.preprocess_layer`), `nebula train` writes the same spec
into the run folder, and a test over every entry checks the two agree.

Every backbone is built as the unit chain `nebula.train.unit_chain` describes:

    model.layers == [preprocess, stem, block_1, ..., block_K, head, pool]

so `nebula train` can cut it anywhere, cache the frozen bottom, and train the top.

Registered:

- `efficientnet_lite0` (default), `efficientnet_lite1`, `efficientnet_lite2`: the
  EfficientNet-Lite ladder at 224, 240 and 260 px, ImageNet weights read offline from
  installed packages (`efficientnet_lite`).
- `mobilenet_v2`: the same unit chain (17 blocks), its ImageNet weights copied from
  `keras.applications.MobileNetV2(weights="imagenet")`, which downloads them once into
  ~/.keras/models; offline and not cached, building it raises BackboneUnavailable.
- `tiny`: random weights, for tests.

Adding a backbone is one `register()` call with its constructor and its facts. MAC
counts are measured on the built model by `count_macs`; a test holds the registry to them.
"""

from __future__ import annotations

import contextlib
import io
import urllib.error
from dataclasses import dataclass
from typing import Callable

from nebula.device.preprocess import PreprocessSpec
from nebula.train import efficientnet_lite
from nebula.train.unit_chain import POOL_LAYER, PREPROCESS_LAYER, preprocess_layer


@dataclass(frozen=True)
class Backbone:
    name: str
    # build(spec, weights) -> keras.Model mapping (S,S,3) raw RGB floats to features; its first layer is preprocess_layer(spec)
    build: Callable[..., object]
    preprocess: PreprocessSpec  # what the device does to a photo before the model, and the first layer's mean/std
    macs: int  # multiply-accumulates of one forward pass at the spec's input size, features only
    feature_dim: int
    default_weights: str  # "pretrained" source, described for people
    offline: bool  # True when the default weights need no network
    # imagenet_classifier(spec, weights) -> the full 1000-class ImageNet model, for `nebula backbone check`; None if none.
    imagenet_classifier: Callable[..., object] | None = None

    @property
    def input_size(self) -> int:
        return self.preprocess.input_size

    def create(self, weights: str | None = "pretrained"):
        """The feature model; weights="pretrained" loads the default weights, None leaves them random."""
        return self.build(self.preprocess, weights)

    def create_imagenet_classifier(self, weights: str | None = "pretrained"):
        if self.imagenet_classifier is None:
            raise ValueError(f"backbone {self.name} has no ImageNet classifier")
        return self.imagenet_classifier(self.preprocess, weights)


class BackboneUnavailable(RuntimeError):
    """A backbone's pretrained weights cannot be had (no network, missing package); the message is one line."""


REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    REGISTRY[backbone.name] = backbone
    return backbone


def get(name: str) -> Backbone:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def create(name: str, weights: str | None = "pretrained"):
    """Build backbone `name`; weights="pretrained" loads its default weights, None leaves them random."""
    return get(name).create(weights)


def trainable_units(model) -> list:
    """The units `--unfreeze N` counts, top first: head, block_K, ..., block_1, stem."""
    return [layer for layer in reversed(model.layers) if layer.name not in (PREPROCESS_LAYER, POOL_LAYER)]


def unfreeze_top(model, n: int) -> None:
    """Make the top `n` units trainable (0 = none: head-only training); BatchNorm stays frozen.

    With a few hundred images, re-estimating BatchNorm statistics hurts more than it
    helps, so BatchNorm layers always run in inference mode with their ImageNet statistics.
    """
    import keras

    model.trainable = True
    units = trainable_units(model)
    if n > len(units):
        raise ValueError(f"--unfreeze {n}: this backbone has only {len(units)} units")
    for i, unit in enumerate(units):
        unit.trainable = i < n
        for layer in getattr(unit, "layers", [unit]):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    for layer in model.layers:
        if layer.name in (PREPROCESS_LAYER, POOL_LAYER):
            layer.trainable = False


def count_macs(model) -> int:
    """Multiply-accumulates of one forward pass, summed over Conv2D, DepthwiseConv2D and Dense layers.

    Nested sub-models are walked; each layer's output shape comes from the built graph.
    """
    from keras import layers

    total = 0
    for layer in model.layers:
        if hasattr(layer, "layers"):
            total += count_macs(layer)
            continue
        if not isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D, layers.Dense)):
            continue
        out_shape = tuple(layer.output.shape[1:])
        kernel = tuple(layer.kernel.shape)
        if isinstance(layer, layers.DepthwiseConv2D):  # (kh, kw, C, multiplier): one kh*kw filter per output channel
            per_output = kernel[0] * kernel[1]
        elif isinstance(layer, layers.Conv2D):  # (kh, kw, C_in / groups, C_out)
            per_output = kernel[0] * kernel[1] * kernel[2]
        else:  # Dense (in, out)
            per_output = kernel[0]
        outputs = 1
        for n in out_shape:
            outputs *= int(n)
        total += outputs * per_output
    return total


def _build_tiny(spec: PreprocessSpec, weights: str | None = None):
    """A few-thousand-parameter backbone with the same unit structure, for tests: random weights only."""
    import keras
    from keras import layers

    def conv_unit(name, filters, stride, kernel=3):
        return keras.Sequential(
            [
                layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False),
                layers.BatchNormalization(epsilon=1e-3),
                layers.ReLU(6.0),
            ],
            name=name,
        )

    model = keras.Sequential(
        [
            keras.Input((spec.input_size, spec.input_size, 3)),
            preprocess_layer(spec),
            conv_unit("stem", 8, 2),
            conv_unit("block_1", 16, 2),
            conv_unit("block_2", 24, 2),
            conv_unit("head", 32, 1, kernel=1),
            layers.GlobalAveragePooling2D(name=POOL_LAYER),
        ],
        name="tiny",
    )
    return model


def _efficientnet_lite(rung: efficientnet_lite.Rung, input_size: int, macs: int) -> Backbone:
    """A registry entry for one EfficientNet-Lite rung: (x - 127) / 128 as the release trained it."""

    def unavailable(build):
        def wrapped(spec, weights="pretrained"):
            try:
                return build(spec, weights)
            except efficientnet_lite.WeightsError as err:
                raise BackboneUnavailable(f"{rung.name}: {err}") from None

        return wrapped

    return Backbone(
        name=rung.name,
        build=unavailable(rung.features),
        preprocess=PreprocessSpec(input_size=input_size, resize_mode="fit", interpolation="bilinear", mean=127.0, std=128.0),
        macs=macs,
        feature_dim=efficientnet_lite.FEATURE_DIM,
        default_weights=f"ImageNet, offline ({rung.pip_name} package)",
        offline=True,
        imagenet_classifier=unavailable(rung.classifier),
    )


# MobileNetV2 (alpha 1.0) as (repeats, kernel, stride, expand, out): the EfficientNet-Lite chain with other stages.
MOBILENET_V2_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (3, 3, 2, 6, 32),
    (4, 3, 2, 6, 64),
    (3, 3, 1, 6, 96),
    (3, 3, 2, 6, 160),
    (1, 3, 1, 6, 320),
)


# keras.applications.mobilenet_v2.preprocess_input: x / 127.5 - 1 (not int8-exact: the mean is not an integer).
MOBILENET_V2_PREPROCESS = PreprocessSpec(input_size=224, resize_mode="fit", interpolation="bilinear", mean=127.5, std=127.5)


def _mobilenet_v2_chain(spec: PreprocessSpec = MOBILENET_V2_PREPROCESS):
    return efficientnet_lite.inverted_residual_chain("mobilenet_v2", MOBILENET_V2_STAGES, spec.input_size, preprocess_layer(spec))


def mobilenet_v2_layer_names(n_blocks: int = 17) -> dict[tuple[str, str], str]:
    """(unit, layer) in our chain -> layer name in keras.applications.MobileNetV2."""
    names = {("stem", "conv_stem"): "Conv1", ("stem", "bn0"): "bn_Conv1", ("head", "conv_head"): "Conv_1", ("head", "bn1"): "Conv_1_bn"}
    for i in range(n_blocks):
        prefix = "expanded_conv_" if i == 0 else f"block_{i}_"
        for ours, theirs in (("expand_conv", "expand"), ("bn0", "expand_BN"), ("depthwise_conv", "depthwise"),
                             ("bn1", "depthwise_BN"), ("project_conv", "project"), ("bn2", "project_BN")):
            if i or ours not in ("expand_conv", "bn0"):  # the first block has no expansion
                names[(f"block_{i + 1}", ours)] = prefix + theirs
    return names


def copy_mobilenet_v2_weights(source, chain) -> None:
    """Copy every weight of a keras.applications.MobileNetV2 into our unit chain, layer by layer."""
    for (unit, layer), theirs in mobilenet_v2_layer_names().items():
        chain.get_layer(unit).get_layer(layer).set_weights(source.get_layer(theirs).get_weights())


def _keras_mobilenet_v2(input_size: int, include_top: bool):
    """keras.applications.MobileNetV2 with ImageNet weights; BackboneUnavailable (one line) when they cannot be downloaded."""
    import keras

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # keras prints "Downloading data from ..." there
            return keras.applications.MobileNetV2(
                input_shape=(input_size, input_size, 3), include_top=include_top, weights="imagenet"
            )
    except (urllib.error.URLError, OSError) as err:
        cause = err
    except Exception as err:  # keras.utils.get_file wraps URLError/HTTPError in a bare Exception
        if not str(err).startswith("URL fetch failure"):
            raise
        cause = str(err).rsplit(" -- ", 1)[-1]
    raise BackboneUnavailable(
        f"mobilenet_v2: cannot download its ImageNet weights into ~/.keras/models (network unreachable: {cause}); "
        "connect once to cache them, or use --backbone efficientnet_lite0, which works offline"
    )


def _build_mobilenet_v2(spec: PreprocessSpec, weights: str | None = "pretrained"):
    chain = _mobilenet_v2_chain(spec)
    if weights is not None:
        copy_mobilenet_v2_weights(_keras_mobilenet_v2(spec.input_size, include_top=False), chain)
    return chain


def _mobilenet_v2_classifier(spec: PreprocessSpec, weights: str | None = "pretrained"):
    import keras

    chain = _mobilenet_v2_chain(spec)
    size = spec.input_size
    classifier = keras.Sequential(
        [keras.Input((size, size, 3), name="image"), chain, keras.layers.Dense(1000, activation="softmax", name="predictions")],
        name="mobilenet_v2_imagenet",
    )
    if weights is not None:
        source = _keras_mobilenet_v2(size, include_top=True)
        copy_mobilenet_v2_weights(source, chain)
        classifier.get_layer("predictions").set_weights(source.get_layer("predictions").get_weights())
    return classifier


# The EfficientNet-Lite ladder: (width, depth, input size) as in the EfficientNet-Lite release.
register(_efficientnet_lite(
    efficientnet_lite.Rung("efficientnet_lite0", width=1.0, depth=1.0, weights_file="efficientnet-lite0-57934424.pth"),
    input_size=224, macs=383_907_552))
register(_efficientnet_lite(
    efficientnet_lite.Rung("efficientnet_lite1", width=1.0, depth=1.1, weights_file="efficientnet-lite1-77cc7160.pth"),
    input_size=240, macs=598_905_232))
register(_efficientnet_lite(
    efficientnet_lite.Rung("efficientnet_lite2", width=1.1, depth=1.2, weights_file="efficientnet-lite2-9656183e.pth"),
    input_size=260, macs=858_456_272))

register(
    Backbone(
        name="mobilenet_v2",
        build=_build_mobilenet_v2,
        preprocess=MOBILENET_V2_PREPROCESS,
        macs=299_494_272,
        feature_dim=1280,
        default_weights="ImageNet, downloaded once by keras.applications (needs network)",
        offline=False,
        imagenet_classifier=_mobilenet_v2_classifier,
    )
)

register(
    Backbone(
        name="tiny",
        build=_build_tiny,
        preprocess=PreprocessSpec(input_size=32, resize_mode="fit", interpolation="bilinear", mean=127.0, std=128.0),
        macs=196_608,
        feature_dim=32,
        default_weights="random (test backbone)",
        offline=True,
    )
)
