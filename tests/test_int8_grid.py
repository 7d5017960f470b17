"""nebula.train.int8_grid: backbone kernels rounded exactly where the TFLite converter would round them."""

import numpy as np
import pytest

from nebula.train import backbones, int8_grid


def mini_lite(seed: int = 0):
    """An EfficientNet-Lite-shaped chain small enough to convert in seconds: stem, one MBConv block
    (expand, depthwise, project, residual), head, pool; BatchNorm statistics made unequal per channel."""
    import keras

    from nebula.train.efficientnet_lite import inverted_residual_chain

    keras.utils.set_random_seed(seed)
    spec = backbones.get("efficientnet_lite0").preprocess
    model = inverted_residual_chain("mini", ((1, 3, 1, 6, 8),), 32, backbones.preprocess_layer(spec), stem_filters=8, head_filters=16)
    rng = np.random.default_rng(seed)
    for _, bn in int8_grid.folded_kernels(model):
        n = bn.moving_variance.shape[0]
        bn.gamma.assign(rng.uniform(0.2, 3.0, n).astype("float32"))
        bn.beta.assign(rng.normal(0, 0.5, n).astype("float32"))
        bn.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.01, 4.0, n).astype("float32"))
    return model


def folded(conv, bn) -> np.ndarray:
    """The kernel as the converter folds it, channels last (Conv2D: kh, kw, cin, cout; depthwise: kh, kw, C)."""
    from keras import layers

    kernel = conv.kernel.numpy().astype(np.float64)
    factor = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    if isinstance(conv, layers.DepthwiseConv2D):
        kernel = kernel.reshape(kernel.shape[0], kernel.shape[1], -1)
    return kernel * factor


def test_every_conv_is_found_with_its_batchnorm():
    model = mini_lite()
    pairs = int8_grid.folded_kernels(model)
    names = [conv.name for conv, _ in pairs]
    assert names == ["conv_stem", "expand_conv", "depthwise_conv", "project_conv", "conv_head"]
    assert all(bn is not None for _, bn in pairs)


def test_snap_rounds_each_weight_by_at_most_half_a_step_and_is_idempotent():
    model = mini_lite()
    before = [folded(c, b) for c, b in int8_grid.folded_kernels(model)]
    assert int8_grid.max_offset(model) > 0.1  # random weights are nowhere near the grid
    assert int8_grid.snap(model) == 5
    assert int8_grid.max_offset(model) < 1e-4
    once = [folded(c, b) for c, b in int8_grid.folded_kernels(model)]
    for old, new in zip(before, once):
        step = np.abs(old).reshape(-1, old.shape[-1]).max(0) / 127
        assert np.all(np.abs(new - old) <= 0.5 * step * (1 + 1e-5))
        np.testing.assert_allclose(np.abs(new).reshape(-1, new.shape[-1]).max(0), step * 127, rtol=1e-6)  # the range is kept
    int8_grid.snap(model)
    for a, (c, b) in zip(once, int8_grid.folded_kernels(model)):
        np.testing.assert_allclose(folded(c, b), a, rtol=1e-6, atol=1e-9)


def test_snap_leaves_batchnorm_and_all_zero_channels_alone():
    model = mini_lite()
    conv, bn = int8_grid.folded_kernels(model)[0]
    kernel = conv.kernel.numpy()
    kernel[..., 0] = 0.0
    conv.kernel.assign(kernel)
    stats = [w.copy() for w in bn.get_weights()]
    int8_grid.snap(model)
    assert np.all(conv.kernel.numpy()[..., 0] == 0.0) and np.all(np.isfinite(conv.kernel.numpy()))
    for a, b in zip(stats, bn.get_weights()):
        np.testing.assert_array_equal(a, b)


def _int8_kernels(flatbuffer: bytes) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """Shape (TFLite layout) -> (int8 values, per-channel scales) of every conv weight in the model."""
    from nebula.device.runtime import load_interpreter_class

    Interpreter, _ = load_interpreter_class()
    interpreter = Interpreter(model_content=flatbuffer)
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    kernels = {}
    for op in interpreter._get_ops_details():
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            weight = details[op["inputs"][1]]
            kernels[tuple(weight["shape"])] = (interpreter.get_tensor(weight["index"]), weight["quantization_parameters"]["scales"])
    return kernels


@pytest.mark.parametrize("snapped", [True, False])
def test_converter_stores_snapped_kernels_without_rounding_them_again(snapped):
    """The integers in the int8 model are our grid points; an unsnapped twin shows the check can fail."""
    from keras import layers

    from nebula.convert.quantize import quantize_int8

    model = mini_lite(seed=1)
    if snapped:
        int8_grid.snap(model)
    rng = np.random.default_rng(1)
    flatbuffer = quantize_int8(model, [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(8)])
    stored = _int8_kernels(flatbuffer)
    assert len(stored) == 5
    worst = 0.0
    for conv, bn in int8_grid.folded_kernels(model):
        ours = folded(conv, bn)
        if isinstance(conv, layers.DepthwiseConv2D):
            values, scales = stored[(1, *ours.shape)]
            values = values[0]
        else:
            values, scales = stored[(ours.shape[3], ours.shape[0], ours.shape[1], ours.shape[2])]
            values = values.transpose(1, 2, 3, 0)  # (cout, kh, kw, cin) -> (kh, kw, cin, cout)
        steps = ours / (np.abs(ours).reshape(-1, ours.shape[-1]).max(0) / 127)  # in units of our grid step
        # The converter may fold other per-channel constants in (the stem takes the 1/128 of
        # preprocessing), which changes the scale but not the integers.
        assert np.all(np.abs(values) <= 127) and len(scales) == ours.shape[-1]
        worst = max(worst, float(np.abs(steps - values).max()))
    if snapped:
        assert worst < 1e-3
    else:
        assert worst > 0.1


def test_preprocessing_converts_to_one_exact_integer_add():
    """(x - 127) / 128 becomes an int8 ADD at scale 1.0 (every byte kept) and a 1/128 folded into the stem."""
    from nebula.convert.quantize import quantize_int8
    from nebula.device.runtime import load_interpreter_class

    model = mini_lite(seed=2)
    rng = np.random.default_rng(2)
    flatbuffer = quantize_int8(model, [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)])
    Interpreter, _ = load_interpreter_class()
    interpreter = Interpreter(model_content=flatbuffer)
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    assert [op["op_name"] for op in ops[:3]] == ["QUANTIZE", "ADD", "CONV_2D"]
    assert details[ops[1]["outputs"][0]]["quantization"][0] == pytest.approx(1.0)
