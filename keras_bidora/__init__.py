"""keras-bidora: BiDoRA fine-tuning for Keras 3 and KerasHub models."""

from keras_bidora.injection import inject
from keras_bidora.injection import injection_config
from keras_bidora.injection import summary
from keras_bidora.layers.bidora_dense import BiDoRADense
from keras_bidora.layers.bidora_dense import direction_regularization
from keras_bidora.recipes import finetune
from keras_bidora.saving import load_adapter_weights
from keras_bidora.saving import merge
from keras_bidora.saving import save_adapter_weights
from keras_bidora.training.model import BiDoRAModel

__version__ = "0.1.0"

__all__ = [
    "BiDoRAModel",
    "BiDoRADense",
    "direction_regularization",
    "finetune",
    "inject",
    "injection_config",
    "load_adapter_weights",
    "merge",
    "save_adapter_weights",
    "summary",
]
