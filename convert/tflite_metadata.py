"""Standard TFLite Metadata in the flatbuffer, so runtimes nobody here wrote can use the file as it is.

MediaPipe Tasks, the TFLite Support Task Library and Android Studio's model viewer
read a `TFLITE_METADATA` entry of the model: a flatbuffer of the Metadata schema
(file identifier ``M001``) that names the input image's colour space, range and
normalisation, and points the output tensor at an associated ``labels.txt`` of type
`TENSOR_AXIS_LABELS`. The associated files themselves live in the zip appended to
the model, which is where our own labels.txt and manifest.json already are
(device/modelfile.py), so both readers share one archive and one labels file.

The normalisation written is the identity (mean 0, std 1 on 0..255): the model takes
raw RGB bytes and does (x - 127) / 128 itself, so a client that applied 127/128 to
a uint8 input would feed it garbage.

We build the Metadata flatbuffer with the `flatbuffers` package alone (TensorFlow's
own dependency), slot by slot from metadata_schema.fbs, rather than pull in
tflite-support (protobuf < 4, which TensorFlow 2.21 no longer accepts) or MediaPipe
(650 MB of OpenCV and friends) at conversion time. MediaPipe checks the result
(convert/mediapipe_check.py).
"""

from __future__ import annotations

import flatbuffers
import numpy as np

from nebula.device.modelfile import LABELS_NAME, MANIFEST_NAME

METADATA_NAME = "TFLITE_METADATA"  # the Model.metadata entry readers look for
_METADATA_IDENTIFIER = b"M001"
_MIN_PARSER_VERSION = "1.0.0"  # every field written here is in the schema's first version

# Enum values and union tags from metadata_schema.fbs.
_FILE_DESCRIPTIONS, _FILE_TENSOR_AXIS_LABELS = 1, 2
_COLOR_SPACE_RGB = 1
_CONTENT_FEATURE, _CONTENT_IMAGE = 1, 2
_PROCESS_UNIT_NORMALIZATION = 1
_UINT8 = 3  # tflite TensorType


def add_metadata(flatbuffer: bytes, labels: list[str], manifest: dict) -> bytes:
    """The model with a `TFLITE_METADATA` entry describing its input and labelled output (replaced if present)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    (subgraph,) = model.subgraphs
    (input_index,), (output_index,) = subgraph.inputs, subgraph.outputs
    input_type, output_type = subgraph.tensors[input_index].type, subgraph.tensors[output_index].type
    metadata = metadata_flatbuffer(labels, manifest, input_uint8=input_type == _UINT8, output_uint8=output_type == _UINT8)

    buffer = schema.BufferT()
    buffer.data = np.frombuffer(metadata, np.uint8)
    entries = model.metadata or []
    existing = [entry for entry in entries if entry.name in (METADATA_NAME, METADATA_NAME.encode())]
    if existing:
        model.buffers[existing[0].buffer] = buffer
    else:
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = METADATA_NAME
        entry.buffer = len(model.buffers) - 1
        model.metadata = [*entries, entry]
    return flatbuffer_utils.convert_object_to_bytearray(model)


def _input_description(preprocess: dict) -> str:
    size = preprocess["input_size"]
    text = (f"RGB image, {size}x{size}, one byte (0..255) per channel, the whole frame resized to fit and padded "
            f"with black ({preprocess.get('resize_mode', 'fit')}); the model does (x - 127) / 128 itself")
    mode = preprocess.get("normalize", "none")
    if mode != "none":
        text += f"; before padding, each channel's {preprocess['background_percentile']:g}th percentile is subtracted"
    if mode == "sky":
        text += (f" and one gain for all channels puts the brightest channel's {preprocess['white_percentile']:g}th "
                 f"percentile at 255")
    if mode != "none":
        text += f" (nebula.device.preprocess, normalize {mode!r})"
    return text


def metadata_flatbuffer(labels: list[str], manifest: dict, input_uint8: bool = True, output_uint8: bool = True) -> bytes:
    """The `ModelMetadata` flatbuffer (identifier M001) for one RGB image in, one score per label out."""
    b = flatbuffers.Builder(1024)

    def string(text):
        return b.CreateString(text) if text is not None else None

    def floats(values):
        b.StartVector(4, len(values), 4)
        for value in reversed(values):
            b.PrependFloat32(value)
        return b.EndVector()

    def tables(offsets):
        b.StartVector(4, len(offsets), 4)
        for offset in reversed(offsets):
            b.PrependUOffsetTRelative(offset)
        return b.EndVector()

    def table(slot_count, offsets=(), bytes_=()):
        """A table from (slot, offset) and (slot, byte value) pairs; None offsets are left out."""
        b.StartObject(slot_count)
        for slot, offset in offsets:
            if offset is not None:
                b.PrependUOffsetTRelativeSlot(slot, offset, 0)
        for slot, value in bytes_:
            b.PrependUint8Slot(slot, value, 0)
        return b.EndObject()

    def associated_file(name, description, kind):  # AssociatedFile: name, description, type
        return table(5, [(0, string(name)), (1, string(description))], [(2, kind)])

    def stats(low, high):  # Stats: max, min
        return table(2, [(0, floats([high])), (1, floats([low]))])

    # Input: a size x size RGB image, raw bytes, normalisation the identity.
    image_properties = table(2, bytes_=[(0, _COLOR_SPACE_RGB)])  # ImageProperties: color_space, default_size
    image_content = table(3, [(1, image_properties)], [(0, _CONTENT_IMAGE)])  # Content: properties type, properties, range
    normalization = table(2, [(0, floats([0.0, 0.0, 0.0])), (1, floats([1.0, 1.0, 1.0]))])  # NormalizationOptions: mean, std
    unit = table(2, [(1, normalization)], [(0, _PROCESS_UNIT_NORMALIZATION)])  # ProcessUnit: options type, options
    input_meta = table(7, [
        (0, string("image")),
        (1, string(_input_description(manifest["preprocess"]))),
        (3, image_content),
        (4, tables([unit])),
        (5, stats(0.0, 255.0) if input_uint8 else None),
    ])

    # Output: one score per label, labels in labels.txt (the zip appended to the model).
    labels_file = associated_file(LABELS_NAME, "The nebula classes, one per line, in output order.", _FILE_TENSOR_AXIS_LABELS)
    feature_content = table(3, [(1, table(0))], [(0, _CONTENT_FEATURE)])
    output_meta = table(7, [
        (0, string("probability")),
        (1, string("Probability of each label: " + ", ".join(labels))),
        (3, feature_content),
        (5, stats(0.0, 255.0) if output_uint8 else stats(0.0, 1.0)),
        (6, tables([labels_file])),
    ])

    subgraph = table(10, [(2, tables([input_meta])), (3, tables([output_meta]))])  # SubGraphMetadata
    manifest_file = associated_file(MANIFEST_NAME, "nebula-classifier manifest: preprocessing, quantization, provenance, "
                                    "test metrics, sha256 of the flatbuffer", _FILE_DESCRIPTIONS)
    run = manifest.get("run") or {}
    model_meta = table(8, [  # ModelMetadata
        (0, string("nebula-classifier")),
        (1, string("Tells what kind of nebula a telescope is looking at, from one RGB frame: " + ", ".join(labels) + ".")),
        (2, string(run.get("name"))),
        (3, tables([subgraph])),
        (4, string("nebula-classifier (nebula convert)")),
        (6, tables([manifest_file])),
        (7, string(_MIN_PARSER_VERSION)),
    ])
    b.Finish(model_meta, file_identifier=_METADATA_IDENTIFIER)
    return bytes(b.Output())
