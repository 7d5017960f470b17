"""nebula-classifier: what kind of nebula is the telescope looking at?

The code lives in three folders mapped into this one namespace:
``nebula.device`` (device/: Raspberry Pi runtime, no TensorFlow), ``nebula.train``
(train/: datasets, backbones, training, evaluation) and ``nebula.convert``
(convert/: int8 TFLite conversion). ``nebula.cli`` is the ``nebula`` command.
"""

__version__ = "0.1.0"
