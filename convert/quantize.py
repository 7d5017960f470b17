"""Keras classifier -> fully int8 TFLite flatbuffer (uint8 in, uint8 out).

The model's first layer does (x - 127) / 128, so with a representative set of raw
RGB images the converter puts the input quantization at (scale 1.0, zero point 0)
and the device feeds pixel bytes as they are. We read the parameters back from the
converted model rather than assume them.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def quantize_int8(model, representative_images: Iterable[np.ndarray]) -> bytes:
    """Full integer quantization with TFLITE_BUILTINS_INT8 only; images are (S, S, 3) uint8."""
    import tensorflow as tf

    images = list(representative_images)
    if not images:
        raise ValueError("the representative dataset is empty")
    # The input is raw bytes, so its range is 0..255 by definition, whatever the
    # calibration photos happen to span. One full-range frame pins it there: the input
    # quantization becomes (1.0, 0) and no bright pixel is ever clipped on the device.
    full_range = np.broadcast_to(np.linspace(0, 255, images[0].shape[1]).astype(np.uint8)[None, :, None], images[0].shape)
    images.append(np.ascontiguousarray(full_range))

    def representative_dataset():
        for image in images:
            yield [image[None].astype(np.float32)]

    # from_keras_model is the recipe that works with TF 2.21 + Keras 3;
    # from_concrete_functions silently yields READ_VARIABLE ops and NaN outputs.
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    return converter.convert()


def io_quantization(flatbuffer: bytes) -> dict:
    """The converted model's actual input/output dtype, shape and (scale, zero point)."""
    from nebula.device.runtime import load_interpreter_class

    Interpreter, _ = load_interpreter_class()
    interpreter = Interpreter(model_content=flatbuffer)
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()

    def describe(detail):
        scale, zero_point = detail["quantization"]
        return {
            "dtype": np.dtype(detail["dtype"]).name,
            "shape": [int(d) for d in detail["shape"]],
            "scale": float(scale),
            "zero_point": int(zero_point),
        }

    return {"input": describe(inp), "output": describe(out)}
