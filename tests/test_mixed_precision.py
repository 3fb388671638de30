"""BiDoRAModel under the `mixed_bfloat16` policy, on the current backend."""

import keras
import numpy as np

from keras_bidora import BiDoRAModel
from tests.test_case import TestCase


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 4, 8)).astype("float32")
    y = rng.normal(size=(100, 1)).astype("float32")
    return x, y


def _train(policy, hypergradient):
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 8))
    hidden = keras.layers.EinsumDense("btd,dhk->bthk", (4, 2, 4), name="query")(
        inputs
    )
    hidden = keras.layers.Reshape((4, 8))(hidden)
    hidden = keras.layers.Dense(16, activation="relu", name="value")(hidden)
    hidden = keras.layers.GlobalAveragePooling1D()(hidden)
    # The head computes in float32, as Keras's mixed-precision guide advises
    # for a model's last layer.
    outputs = keras.layers.Dense(1, name="head", dtype="float32")(hidden)
    model = BiDoRAModel(
        keras.Model(inputs, outputs),
        rank=2,
        targets=["query", "value"],
        hypergradient=hypergradient,
        upper_batch_size=4,
        seed=0,
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x, y = _data()
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    return model, history.history


class MixedPrecisionTest(TestCase):
    def test_mixed_bfloat16_matches_float32(self):
        # DARTS, the default, also runs the first-order estimator's pass;
        # its finite difference is the part most sensitive to rounding.
        _, reference = _train("float32", "darts")
        model, history = _train("mixed_bfloat16", "darts")

        for layer in model.adapted_layers:
            self.assertEqual(layer.compute_dtype, "bfloat16")
            for variable in (layer.lora_a, layer.lora_b, layer.magnitude):
                self.assertEqual(variable.dtype, "float32")
        query = model.adapted_layers[0]
        output = query(np.zeros((2, 4, 8), "float32"))
        self.assertDTypeEqual(output, "bfloat16")
        for variable in model.optimizer.variables:
            if "momentum" in variable.path or "velocity" in variable.path:
                self.assertEqual(variable.dtype, "float32")

        for key in ("loss", "upper_loss"):
            self.assertTrue(np.all(np.isfinite(history[key])))
            # bfloat16 keeps 8 bits of mantissa (a relative error of 0.4%
            # per rounding); two epochs on this problem stay within 3%.
            self.assertAllClose(
                history[key], reference[key], rtol=3e-2, atol=1e-2
            )
        # Training moved the losses, so the match above is not vacuous.
        self.assertNotAllClose(
            reference["loss"][0], reference["loss"][1], atol=1e-3
        )
