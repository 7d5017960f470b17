"""The unit chain every backbone is built as, and its first layer, built from the backbone's PreprocessSpec.

    model.layers == [preprocess, stem, block_1, ..., block_K, head, pool]

`preprocess` computes (x - mean) / std on raw RGB 0..255 with the numbers of the
backbone's `PreprocessSpec`, each `block_k` is one sub-model (its residual stays inside),
`head` is the last 1x1 conv, and `pool` is global average pooling to the feature vector.
Cutting the chain lets training cache the frozen bottom's output and train only the top.

The registry (`backbones`) and the architectures (`efficientnet_lite`, MobileNetV2 in
`backbones`) both import this module, and it imports neither, so they form no circle.
"""

from __future__ import annotations

from nebula.device.preprocess import PreprocessSpec

PREPROCESS_LAYER = "preprocess"
POOL_LAYER = "pool"


def preprocess_layer(spec: PreprocessSpec, name: str = PREPROCESS_LAYER):
    """(x - spec.mean) / spec.std on raw RGB 0..255: subtract, then scale, as two Rescaling layers.

    The order matters to the int8 model. One Rescaling is x * (1/std) + offset,
    and the int8 tensor between the multiply and the add covers about -1..2 in 255
    steps, merging neighbouring byte values. Subtracting first keeps every byte
    distinct (x - 127 is an integer), and the converter folds the 1/std into the
    stem convolution, so with an integer mean the int8 input path is exact.
    """
    import keras

    return keras.Sequential(
        [keras.layers.Rescaling(1.0, offset=-spec.mean, name="center"), keras.layers.Rescaling(1.0 / spec.std, name="scale")],
        name=name,
    )
