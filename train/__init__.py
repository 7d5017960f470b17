"""The workstation side: datasets, backbones, training and evaluation.

Modules that need TensorFlow import it themselves; `manifest` and the dataset
builders do not, so `nebula data` runs before TensorFlow is even needed.
"""
