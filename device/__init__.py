"""The device side: everything the Raspberry Pi runs. Never imports TensorFlow.

It is the lowest layer and owns the contracts the other sides read:
``preprocess`` (how pixels become the model's input), ``modelfile`` (the
self-describing .tflite format), ``formats`` (what counts as an image),
``record`` (what a result line holds), ``config`` (every device default),
``scoring`` (how answers are scored) and ``skycatalog`` (the catalog type -> label
rules and the catalog file's format). ``runtime`` loads a model once and runs it;
``position``, ``platesolve`` and ``identify`` say where a capture points and what
the catalogs say is there.
"""
