"""keras-bidora: BiDoRA fine-tuning for Keras 3 and KerasHub models."""

from keras_bidora.layers.bidora_dense import BiDoRADense
from keras_bidora.layers.bidora_dense import direction_regularization
from keras_bidora.models.bidora_model import BiDoRAModel

__version__ = "0.1.0"

__all__ = [
    "BiDoRAModel",
    "BiDoRADense",
    "direction_regularization",
]
