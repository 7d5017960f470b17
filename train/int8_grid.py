"""Backbone weights on the int8 grid: the converter's weight rounding, done once before training.

Full-integer TFLite conversion folds each BatchNormalization into the convolution
before it and stores the folded kernel as int8 with one symmetric scale per output
channel: scale = max|w| / 127, w ~ round(w / scale) * scale. On EfficientNet-Lite0
and sky photographs that weight rounding, not the activation quantization, was most
of the float/int8 gap (measured in README.md, "int8 against float").

So `nebula train` rounds the pretrained backbone onto that grid before anything
trains on it. The head then learns from the features the int8 model will compute
(activation rounding aside), and the float model that is scored is the one the
converter reproduces. It is the weight half of quantization-aware training with
nothing to learn: the frozen units are rounded once; units that fine-tuning moved
are rounded again when it ends.

    from nebula.train import int8_grid
    int8_grid.snap(backbone)          # -> number of kernels rounded
    int8_grid.max_offset(backbone)    # -> 0.0 once snapped (in quantization steps)
"""

from __future__ import annotations

import numpy as np

QMAX = 127  # TFLite int8 weights are symmetric: -127..127, zero point 0


def folded_kernels(model) -> list[tuple[object, object | None]]:
    """Every Conv2D / DepthwiseConv2D in `model` (sub-models walked), with the BatchNormalization right after it, or None.

    "Right after" is the next layer of the same (sub-)model with as many channels,
    the pattern the converter folds; our backbones are built that way.
    """
    from keras import layers

    found = []
    inner = list(model.layers)
    for i, layer in enumerate(inner):
        if hasattr(layer, "layers"):
            found.extend(folded_kernels(layer))
            continue
        if not isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D)):
            continue
        after = inner[i + 1] if i + 1 < len(inner) else None
        channels = _output_channels(layer)
        if isinstance(after, layers.BatchNormalization) and int(after.moving_variance.shape[0]) == channels:
            found.append((layer, after))
        else:
            found.append((layer, None))
    return found


def _output_channels(conv) -> int:
    from keras import layers

    kernel = conv.kernel.shape
    return int(kernel[2] * kernel[3]) if isinstance(conv, layers.DepthwiseConv2D) else int(kernel[3])


def _fold_factor(conv, bn) -> np.ndarray:
    """Per output channel: what BatchNormalization multiplies the conv output by (gamma / sqrt(var + eps))."""
    if bn is None:
        return np.ones(_output_channels(conv), np.float64)
    gamma = np.asarray(bn.gamma.numpy(), np.float64) if bn.scale else 1.0
    return gamma / np.sqrt(np.asarray(bn.moving_variance.numpy(), np.float64) + bn.epsilon)


def _per_output_channel(kernel: np.ndarray, depthwise: bool) -> np.ndarray:
    """The kernel as (..., output channel): Conv2D already is; depthwise (kh, kw, C, m) becomes (kh, kw, C*m)."""
    return kernel.reshape(kernel.shape[0], kernel.shape[1], -1) if depthwise else kernel


def _grid(folded: np.ndarray) -> np.ndarray:
    """The per-output-channel scale the converter picks for a folded kernel (channels last)."""
    scale = np.abs(folded).reshape(-1, folded.shape[-1]).max(axis=0) / QMAX
    return np.where(scale > 0, scale, 1.0)  # an all-zero channel stays zero whatever its scale


def snap(model) -> int:
    """Round every folded kernel in `model` onto its int8 grid, in place; returns how many kernels there were.

    The BatchNormalization layers are untouched: the kernel is rounded in folded
    space and divided back, so folding it again lands exactly on the grid.
    """
    from keras import layers

    pairs = folded_kernels(model)
    for conv, bn in pairs:
        depthwise = isinstance(conv, layers.DepthwiseConv2D)
        kernel = np.asarray(conv.kernel.numpy(), np.float64)
        factor = _fold_factor(conv, bn)
        folded = _per_output_channel(kernel, depthwise) * factor
        scale = _grid(folded)
        rounded = np.round(folded / scale) * scale / factor
        conv.kernel.assign(rounded.reshape(kernel.shape).astype(np.float32))
    return len(pairs)


def max_offset(model) -> float:
    """The largest distance of any folded kernel weight from its int8 grid point, in quantization steps (0..0.5)."""
    from keras import layers

    worst = 0.0
    for conv, bn in folded_kernels(model):
        kernel = np.asarray(conv.kernel.numpy(), np.float64)
        folded = _per_output_channel(kernel, isinstance(conv, layers.DepthwiseConv2D)) * _fold_factor(conv, bn)
        steps = folded / _grid(folded)
        worst = max(worst, float(np.abs(steps - np.round(steps)).max()))
    return worst
