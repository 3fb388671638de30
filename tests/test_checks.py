"""Tests of `keras_bidora.checks` and of the arguments that go through it.

The counts of the layer, `inject`, `BiDoRAModel`, the recipe and the data
are checked by one function: NumPy integers are counts, bools are not,
and a count stored in a config is a plain `int` (JSON-serializable).
"""

import json

import keras
import numpy as np
import pytest

from keras_bidora import BiDoRADense
from keras_bidora import BiDoRAModel
from keras_bidora import inject
from keras_bidora.checks import check_count
from keras_bidora.data import loaders
from keras_bidora.injection import injection_config


@pytest.mark.parametrize("value", [3, np.int32(3), np.int64(3), np.uint8(3)])
def test_integers_are_counts_returned_as_int(value):
    checked = check_count("epochs", value, 1)
    assert checked == 3
    assert type(checked) is int


@pytest.mark.parametrize(
    "value", [True, False, 3.0, 2.5, "3", np.float64(3.0), None, [3]]
)
def test_other_values_are_refused_quoting_them(value):
    with pytest.raises(ValueError) as raised:
        check_count("epochs", value, 0)
    message = str(raised.value)
    assert "epochs must be an integer >= 0" in message
    assert f"Received: epochs={value!r}" in message


def test_minimum_is_the_smallest_count_allowed():
    assert check_count("terms", 0, 0) == 0
    with pytest.raises(ValueError, match=r"terms=-1"):
        check_count("terms", -1, 0)
    with pytest.raises(ValueError, match=r">= 3\. Received: length=2"):
        check_count("length", 2, 3)


def test_none_only_where_allowed():
    assert check_count("limit", None, 1, allow_none=True) is None
    with pytest.raises(ValueError, match=r">= 1 or None\. .*limit=0"):
        check_count("limit", 0, 1, allow_none=True)


def _dense():
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    return layer


def test_numpy_rank_is_stored_as_int():
    layer = BiDoRADense(_dense(), rank=np.int64(2))
    assert type(layer.rank) is int
    assert layer.get_config()["rank"] == 2
    json.dumps(layer.get_config()["rank"])

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="query")(inputs))
    inject(model, rank=np.int64(2))
    json.dumps(injection_config(model)["rank"])


def test_bool_counts_are_refused_before_anything_changes():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="query")(inputs))
    for name in ("upper_every", "neumann_terms"):
        with pytest.raises(ValueError, match=f"{name}=True"):
            BiDoRAModel(model, **{name: True})
    with pytest.raises(ValueError, match="rank=True"):
        inject(model, rank=True)
    # Nothing was injected by the refused calls.
    assert not [v for v in model.weights if "lora" in v.path]


def test_loaders_limit():
    assert len(loaders.load_task("rte", "dev", limit=np.int64(2))) == 2
    with pytest.raises(ValueError, match="limit=True"):
        loaders.load_task("rte", "dev", limit=True)


def test_upper_batch_size_takes_numpy_integers_and_its_two_words():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="query")(inputs))
    wrapped = BiDoRAModel(model, upper_batch_size=np.int64(4))
    assert type(wrapped.get_config()["upper_batch_size"]) is int
    json.dumps(wrapped.get_config()["upper_batch_size"])
    for value in (True, 0, 2.0, "half"):
        with pytest.raises(ValueError, match="upper_batch_size must be a"):
            BiDoRAModel(model, upper_batch_size=value)
