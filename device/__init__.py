"""The device side: everything the Raspberry Pi runs. Never imports TensorFlow.

It is the lowest layer and owns the two contracts the other sides read:
``preprocess`` (how pixels become the model's input) and ``modelfile`` (the
self-describing .tflite format). ``runtime`` loads a model once and runs it.
"""
