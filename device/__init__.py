"""The device side: everything the Raspberry Pi runs. Never imports TensorFlow.

It is the lowest layer and owns the contracts the other sides read:
``preprocess`` (how pixels become the model's input), ``modelfile`` (the
self-describing .tflite format), ``formats`` (what counts as an image),
``record`` (what a result line holds), ``config`` (every device default) and
``scoring`` (how answers are scored). ``runtime`` loads a model once and runs it.
"""
