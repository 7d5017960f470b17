"""Backbone registry: a name maps to a constructor and the facts that travel with its weights.

Every backbone is built as a chain of units that `nebula train` can cut anywhere:

    model.layers == [preprocess, stem, block_1, ..., block_K, head, pool]

`preprocess` is the (x - 127) / 128 scaling (so the model takes raw RGB 0..255),
each `block_k` is one sub-model (its residual stays inside), `head` is the last
1x1 conv, and `pool` is global average pooling to the feature vector. Cutting the
chain lets training cache the frozen bottom's output and train only the top.
"""

from __future__ import annotations

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


def preprocess_layer(name: str = PREPROCESS_LAYER):
    """(x - 127) / 128 on raw RGB 0..255, as a Rescaling layer (so the int8 input maps 1:1 to bytes)."""
    import keras

    return keras.layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name=name)


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


register(
    Backbone(
        name="tiny",
        build=_build_tiny,
        input_size=32,
        preprocessing="(x - 127) / 128",
        macs=0,
        feature_dim=32,
        default_weights="random (test backbone)",
        offline=True,
    )
)
