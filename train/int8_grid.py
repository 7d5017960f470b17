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


def _in_steps(conv, bn) -> tuple[np.ndarray, np.ndarray]:
    """The folded kernel in units of its int8 step, channels last (depthwise (kh, kw, C, m) as (kh, kw, C*m)),
    and what converts those units back to the layer's own kernel (step / fold factor, per output channel)."""
    from keras import layers

    kernel = np.asarray(conv.kernel.numpy(), np.float64)
    if isinstance(conv, layers.DepthwiseConv2D):
        kernel = kernel.reshape(kernel.shape[0], kernel.shape[1], -1)
    factor = _fold_factor(conv, bn)
    folded = kernel * factor
    step = np.abs(folded).reshape(-1, folded.shape[-1]).max(axis=0) / QMAX  # the converter's per-channel scale
    step = np.where(step > 0, step, 1.0)  # an all-zero channel stays zero whatever its scale
    return folded / step, step / factor


def snap(model) -> int:
    """Round every folded kernel in `model` onto its int8 grid, in place; returns how many kernels there were.

    The BatchNormalization layers are untouched: the kernel is rounded in folded
    space and divided back, so folding it again lands exactly on the grid.
    """
    pairs = folded_kernels(model)
    for conv, bn in pairs:
        steps, to_kernel = _in_steps(conv, bn)
        conv.kernel.assign((np.round(steps) * to_kernel).reshape(conv.kernel.shape).astype(np.float32))
    return len(pairs)


def max_offset(model) -> float:
    """The largest distance of any folded kernel weight from its int8 grid point, in quantization steps (0..0.5)."""
    worst = 0.0
    for conv, bn in folded_kernels(model):
        steps, _ = _in_steps(conv, bn)
        worst = max(worst, float(np.abs(steps - np.round(steps)).max()))
    return worst
