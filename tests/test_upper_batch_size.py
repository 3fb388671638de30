"""Tests of `upper_batch_size`, `"proportional"` above all.

`"proportional"` sizes the upper batches to the upper split, so that an
epoch at `upper_every=1` reads each split once. Each test computes the
expected size from the formula, `max(1, round(batch_size * upper_fraction
/ (1 - upper_fraction)))`, and reads the batches the bi-level step
receives (a wrapper around `STEPS["bilevel"]`). The data below is 120
samples in batches of 12, of which 24 (2 batches) go to the upper split:
8 lower steps an epoch, and 8 upper batches of 3 are one pass over the
upper split.
"""

import json
import re
from unittest import mock

import keras
import numpy as np

from keras_bidora import BiDoRAModel
from keras_bidora.layers.bidora_dense import adapted_layers
from keras_bidora.training import step as step_lib
from tests.test_bidora_model import ArrayPyDataset
from tests.test_bidora_model import adapter
from tests.test_bidora_model import build_base
from tests.test_bidora_model import build_plain_base
from tests.test_bidora_model import make_data
from tests.test_bidora_model import set_weights
from tests.test_case import TestCase
from tests.test_case import to_numpy

SAMPLES = 120
BATCH_SIZE = 12
UPPER_FRACTION = 0.2
LOWER_STEPS = 8


def proportional(batch_size, upper_fraction=UPPER_FRACTION):
    ratio = upper_fraction / (1 - upper_fraction)
    return max(1, round(batch_size * ratio))


def build_scalar_base(seed=0):
    """A model of one scalar feature per sample: its dataset is unbatched."""
    inputs = keras.Input((), name="x")
    features = keras.layers.Reshape((1,))(inputs)
    hidden = adapter(5, 1, "first")(features)
    hidden = keras.layers.Activation("tanh")(hidden)
    hidden = adapter(3, 5, "second")(hidden)
    outputs = keras.layers.Dense(2, name="head")(hidden)
    model = keras.Model(inputs, outputs)
    set_weights(model, seed)
    return model


class Recorder:
    """Patches the bi-level step to count its calls and keep each `x`.

    With `record`, the steps must run eagerly (their batches concrete).
    """

    def __init__(self, record=True):
        self.record = record
        self.lower, self.upper = [], []
        self.calls = 0
        self._step = step_lib.STEPS["bilevel"]

    def __call__(self, model, state, data):
        self.calls += 1
        if self.record:
            self.lower.append(to_numpy(data[0][0]))
            self.upper.append(to_numpy(data[1][0]))
        return self._step(model, state, data)

    def patch(self):
        return mock.patch.dict(step_lib.STEPS, {"bilevel": self})


def rows(batches):
    """The samples of `batches` as a sorted list of tuples."""
    flat = np.concatenate([b.reshape(len(b), -1) for b in batches])
    return sorted(map(tuple, flat.tolist()))


class UpperBatchSizeTest(TestCase):
    def compiled(self, base=None, run_eagerly=True, **kwargs):
        kwargs.setdefault("upper_fraction", UPPER_FRACTION)
        model = BiDoRAModel(
            build_base() if base is None else base,
            hypergradient="first_order",
            **kwargs,
        )
        # Eager steps receive concrete batches on every backend.
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss="mse",
            run_eagerly=run_eagerly,
        )
        return model

    def fit_and_record(self, model, *args, record=True, **kwargs):
        recorder = Recorder(record)
        with recorder.patch():
            model.fit(*args, verbose=0, **kwargs)
        return recorder

    def assertOnePassOverTheUpperSplit(self, recorder, x, upper_size):
        # Every upper batch has `upper_size` samples, and an epoch's upper
        # batches hold each sample that no lower batch holds, once.
        self.assertLen(recorder.upper, LOWER_STEPS)
        for batch in recorder.upper:
            self.assertEqual(len(batch), upper_size)
        lower = set(rows(recorder.lower))
        held_out = [row for row in rows([x]) if row not in lower]
        self.assertLen(held_out, SAMPLES - LOWER_STEPS * BATCH_SIZE)
        self.assertEqual(rows(recorder.upper), held_out)

    # Sizes ---------------------------------------------------------------

    def test_arrays(self):
        x, y = make_data(SAMPLES)
        model = self.compiled()
        recorder = self.fit_and_record(
            model, x, y, batch_size=BATCH_SIZE, upper_batch_size="proportional"
        )
        self.assertOnePassOverTheUpperSplit(
            recorder, x, proportional(BATCH_SIZE)
        )

    def test_explicit_upper_data_takes_upper_fractions_ratio(self):
        x, y = make_data(SAMPLES)
        lower, upper = slice(0, 96), slice(96, None)
        model = self.compiled(upper_batch_size="proportional")
        recorder = self.fit_and_record(
            model,
            x[lower],
            y[lower],
            batch_size=BATCH_SIZE,
            upper_data=(x[upper], y[upper]),
        )
        self.assertOnePassOverTheUpperSplit(
            recorder, x, proportional(BATCH_SIZE)
        )

    def test_py_dataset(self):
        # Relative to the PyDataset's batch size; its upper batches are
        # regrouped.
        x, y = make_data(SAMPLES)
        model = self.compiled(upper_batch_size="proportional")
        recorder = self.fit_and_record(
            model, ArrayPyDataset(x, y, batch_size=BATCH_SIZE)
        )
        self.assertOnePassOverTheUpperSplit(
            recorder, x, proportional(BATCH_SIZE)
        )

    def test_py_dataset_regrouped_to_an_integer_size(self):
        # 24 upper samples in batches of 5: the fifth wraps around.
        x, y = make_data(SAMPLES)
        model = self.compiled(upper_batch_size=5)
        recorder = self.fit_and_record(
            model, ArrayPyDataset(x, y, batch_size=BATCH_SIZE), shuffle=False
        )
        self.assertEqual([len(b) for b in recorder.upper], [5] * LOWER_STEPS)
        upper = np.concatenate(recorder.upper)
        self.assertAllClose(upper[24:], upper[: 5 * LOWER_STEPS - 24])
        self.assertLen(set(rows([upper[:24]])), 24)

    def test_batched_tf_dataset(self):
        # Relative to the dataset's first batch's size.
        import tensorflow as tf

        x, y = make_data(SAMPLES)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH_SIZE)
        model = self.compiled(upper_batch_size="proportional")
        recorder = self.fit_and_record(model, dataset)
        self.assertOnePassOverTheUpperSplit(
            recorder, x, proportional(BATCH_SIZE)
        )

    def test_unbatched_tf_dataset(self):
        # Relative to fit's batch_size, which batches the samples.
        import tensorflow as tf

        x, y = make_data(SAMPLES)
        x = x[:, 0]
        dataset = tf.data.Dataset.from_tensor_slices((x, y))
        model = self.compiled(
            base=build_scalar_base(), upper_batch_size="proportional"
        )
        recorder = self.fit_and_record(model, dataset, batch_size=BATCH_SIZE)
        self.assertOnePassOverTheUpperSplit(
            recorder, x, proportional(BATCH_SIZE)
        )

    def test_at_least_one_sample(self):
        x, y = make_data(40)
        model = self.compiled(upper_fraction=0.1)
        # 4 * 0.1 / 0.9 rounds to 0.
        recorder = self.fit_and_record(
            model, x, y, batch_size=4, upper_batch_size="proportional"
        )
        self.assertEqual({len(b) for b in recorder.upper}, {1})

    # Compilation ---------------------------------------------------------

    def test_one_trace_per_phase(self):
        import tensorflow as tf

        x, y = make_data(SAMPLES)
        data = {
            "arrays": ((x, y), {"batch_size": BATCH_SIZE}),
            "PyDataset": ((ArrayPyDataset(x, y, BATCH_SIZE),), {}),
            "tf.data": (
                (tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH_SIZE),),
                {},
            ),
        }
        for name, (args, kwargs) in data.items():
            model = self.compiled(
                run_eagerly=False, upper_batch_size="proportional"
            )
            recorder = self.fit_and_record(
                model, *args, epochs=2, record=False, **kwargs
            )
            if keras.config.backend() == "torch":
                # Eager: each step runs once.
                self.assertEqual(recorder.calls, 2 * LOWER_STEPS, msg=name)
            else:
                self.assertEqual(recorder.calls, 1, msg=name)

    # Saving and errors ---------------------------------------------------

    def test_config_round_trip(self):
        model = BiDoRAModel(
            build_plain_base(),
            rank=2,
            targets=["first", "second"],
            upper_batch_size="proportional",
        )
        config = json.loads(json.dumps(model.get_config()))
        self.assertEqual(config["upper_batch_size"], "proportional")
        restored = BiDoRAModel.from_config(config)
        self.assertEqual(restored.upper_batch_size, "proportional")

    def test_bad_values_change_nothing(self):
        x, y = make_data(20)
        for value in (0, -3, 2.5, 4.0, True, "half", "Proportional", "8"):
            message = re.escape(f"upper_batch_size={value!r}")
            base = build_plain_base()
            before = [to_numpy(w) for w in base.weights]
            with self.assertRaisesRegex(ValueError, message):
                BiDoRAModel(base, rank=2, upper_batch_size=value)
            self.assertEmpty(adapted_layers(base))
            self.assertAllClose([to_numpy(w) for w in base.weights], before)

            model = self.compiled()
            before = [to_numpy(w) for w in model.weights]
            with self.assertRaisesRegex(ValueError, "'proportional'"):
                model.fit(x, y, upper_batch_size=value, verbose=0)
            self.assertAllClose([to_numpy(w) for w in model.weights], before)
            self.assertEqual(int(to_numpy(model.optimizer.iterations)), 0)
