"""The workstation side of deployment: Keras run folder -> self-describing int8 .tflite."""
