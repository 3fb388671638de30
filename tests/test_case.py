"""Shared test helpers, in the spirit of keras-hub's `tests/test_case.py`.

The same test files run under every `KERAS_BACKEND`; the helpers here hide
the few places where the backends differ (tensor conversion, gradients).
"""

import importlib.util
import os
import shutil
import tempfile

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops
from keras import tree


def to_numpy(x):
    """Converts a backend tensor, variable or array-like to NumPy."""
    if isinstance(x, keras.Variable):
        x = x.value
    if isinstance(x, np.ndarray):
        return x
    if ops.is_tensor(x) or hasattr(x, "__array__"):
        # `convert_to_numpy` also detaches torch tensors that require grad.
        return ops.convert_to_numpy(x)
    return np.asarray(x)


def load_benchmark(name):
    """Imports `benchmarks/<name>.py`, a script and not a package module."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_bert_preset(folder):
    """Saves a 1-layer random BERT with the default model's tokenizer.

    For tests of scripts that load a preset folder and care about the
    pipeline (tokenizing real text, the run's bookkeeping), not about
    accuracy: it loads and trains in a fraction of the real model's time.

    Returns:
        `folder`.
    """
    import keras_hub

    from keras_bidora import data

    tokenizer = keras_hub.models.BertTokenizer.from_preset(
        data.default_preset()
    )
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=512,
    )
    backbone.save_to_preset(folder)
    tokenizer.save_to_preset(folder)
    return folder


def _comparable(x):
    x = np.asarray(x)
    # NumPy cannot compare ml_dtypes' bfloat16 (dtype kind "V") directly.
    if x.dtype.kind == "V" or x.dtype.name == "bfloat16":
        x = x.astype("float32")
    return x


def gradients(fn, variables):
    """Gradients of a scalar function with respect to Keras variables.

    Args:
        fn: a function of no arguments returning a scalar tensor; it reads
            the variables (for example by calling a layer that owns them).
        variables: a list of `keras.Variable`s, all trainable.

    Returns:
        A list of NumPy arrays, one per variable, in the same order. A
        variable the function does not depend on gets zeros.
    """
    variables = list(variables)
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        values = [v.value for v in variables]
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss = fn()
        grads = tape.gradient(loss, values)
    elif backend == "jax":
        import jax

        def stateless_fn(values):
            mapping = list(zip(variables, values))
            with keras.StatelessScope(state_mapping=mapping):
                return fn()

        grads = jax.grad(stateless_fn)([v.value for v in variables])
    elif backend == "torch":
        import torch

        values = [v.value for v in variables]
        loss = fn()
        grads = torch.autograd.grad(loss, values, allow_unused=True)
    else:
        raise ValueError(f"Unsupported backend: {backend}")
    return [
        np.zeros(tuple(v.shape), dtype=v.dtype) if g is None else to_numpy(g)
        for v, g in zip(variables, grads)
    ]


class TestCase(parameterized.TestCase):
    """Base test class: backend-neutral assertions and layer round trips."""

    def get_temp_dir(self):
        temp_dir = tempfile.mkdtemp()
        self.addCleanup(lambda: shutil.rmtree(temp_dir, ignore_errors=True))
        return temp_dir

    def _flat_pairs(self, a, b, msg=None):
        """The leaves of `a` and `b` as NumPy pairs; fails if the two
        structures have different numbers of leaves."""
        a = tree.map_structure(to_numpy, a)
        b = tree.map_structure(to_numpy, b)
        flat_a, flat_b = tree.flatten(a), tree.flatten(b)
        if len(flat_a) != len(flat_b):
            # Before comparing any pair: an array against a list of numbers
            # would otherwise be compared with the list's first number.
            self.fail(
                f"{msg + ': ' if msg else ''}the structures differ: "
                f"{len(flat_a)} arrays against {len(flat_b)} (pass a list "
                "of numbers as one np.array). Received shapes: "
                f"{tree.map_structure(np.shape, a)} and "
                f"{tree.map_structure(np.shape, b)}"
            )
        return list(zip(flat_a, flat_b))

    def assertAllClose(self, a, b, atol=1e-6, rtol=1e-6, msg=None):
        for x, y in self._flat_pairs(a, b, msg):
            np.testing.assert_allclose(
                _comparable(x),
                _comparable(y),
                atol=atol,
                rtol=rtol,
                err_msg=msg or "",
            )

    def assertNotAllClose(self, a, b, atol=1e-6, rtol=1e-6, msg=None):
        # Structures that differ are an error, not a sign of "not close".
        self._flat_pairs(a, b, msg)
        try:
            self.assertAllClose(a, b, atol=atol, rtol=rtol)
        except AssertionError:
            return
        self.fail(msg or f"The arrays are close:\n{to_numpy(a)}")

    def assertDTypeEqual(self, x, expected_dtype):
        self.assertEqual(
            keras.backend.standardize_dtype(x.dtype), expected_dtype
        )

    def run_layer_test(
        self,
        layer_fn,
        input_data,
        expected_output_shape=None,
        expected_num_trainable_weights=None,
        expected_num_non_trainable_weights=None,
        run_training_check=True,
        run_mixed_precision_check=True,
        mixed_precision_policies=("mixed_float16", "mixed_bfloat16"),
    ):
        """Builds, calls, round-trips, trains and mixed-precision-checks.

        Args:
            layer_fn: a function of no arguments returning a new layer. It is
                called again under each mixed-precision global policy, so
                that any wrapped layer it builds gets that policy too.
            input_data: a NumPy array with a leading batch axis of at
                least 2.
            expected_output_shape: the output's shape, if given.
            expected_num_trainable_weights: checked after the first call.
            expected_num_non_trainable_weights: checked after the first call.
            run_training_check: fit two steps; every trainable weight must
                change and every non-trainable weight must not.
            run_mixed_precision_check: call the layer under each policy of
                `mixed_precision_policies`; the output must have the policy's
                compute dtype and be close to the float32 output.
            mixed_precision_policies: the policies to check.
        """
        layer = layer_fn()
        output = layer(input_data)
        self.assertTrue(layer.built)
        if expected_output_shape is not None:
            self.assertEqual(tuple(output.shape), tuple(expected_output_shape))
            # Like EinsumDense's, the static shape may leave axes unknown.
            static_shape = layer.compute_output_shape(input_data.shape)
            self.assertLen(static_shape, len(expected_output_shape))
            for static, expected in zip(static_shape, expected_output_shape):
                self.assertIn(static, (None, expected))
        if expected_num_trainable_weights is not None:
            self.assertLen(
                layer.trainable_weights, expected_num_trainable_weights
            )
        if expected_num_non_trainable_weights is not None:
            self.assertLen(
                layer.non_trainable_weights, expected_num_non_trainable_weights
            )

        # Config round trip: same outputs once the weights are copied.
        config = layer.get_config()
        restored = layer.__class__.from_config(config)
        restored(input_data)
        restored.set_weights(layer.get_weights())
        self.assertAllClose(restored(input_data), output, atol=1e-6)
        self.assertEqual(restored.get_config(), config)

        if run_training_check:
            self._run_training_check(layer_fn, input_data)

        if run_mixed_precision_check:
            for policy in mixed_precision_policies:
                self._run_mixed_precision_check(
                    layer_fn, input_data, policy, layer.get_weights(), output
                )

    def _run_training_check(self, layer_fn, input_data):
        layer = layer_fn()
        inputs = keras.Input(shape=input_data.shape[1:])
        model = keras.Model(inputs, layer(inputs))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        output_shape = tuple(model(input_data).shape)
        targets = np.random.default_rng(0).normal(size=output_shape)
        targets = targets.astype("float32")
        trainable = [to_numpy(w) for w in layer.trainable_weights]
        non_trainable = [to_numpy(w) for w in layer.non_trainable_weights]
        # Two steps: a zero-initialised factor (LoRA's B) blocks the other
        # factor's gradient on the first step.
        model.fit(
            input_data,
            targets,
            batch_size=input_data.shape[0],
            epochs=2,
            verbose=0,
        )
        for before, weight in zip(trainable, layer.trainable_weights):
            self.assertNotAllClose(
                before, weight, msg=f"{weight.path} did not change"
            )
        for before, weight in zip(non_trainable, layer.non_trainable_weights):
            self.assertAllClose(
                before, weight, msg=f"{weight.path} changed", atol=0, rtol=0
            )

    def _run_mixed_precision_check(
        self, layer_fn, input_data, policy, float32_weights, float32_output
    ):
        keras.config.set_dtype_policy(policy)
        try:
            layer = layer_fn()
            layer(input_data)
            layer.set_weights(float32_weights)
            output = layer(input_data)
        finally:
            keras.config.set_dtype_policy("float32")
        compute_dtype = layer.dtype_policy.compute_dtype
        self.assertEqual(layer.dtype_policy.name, policy)
        for x in tree.flatten(output):
            self.assertDTypeEqual(x, compute_dtype)
        for weight in layer.weights:
            if "float" in weight.dtype:
                self.assertEqual(
                    weight.dtype, "float32", msg=f"{weight.path} in {policy}"
                )
        # bfloat16 keeps 8 significant bits, float16 11.
        self.assertAllClose(
            tree.map_structure(
                lambda x: to_numpy(ops.cast(x, "float32")), output
            ),
            float32_output,
            atol=5e-2,
            rtol=5e-2,
        )

    def run_model_saving_test(self, model, input_data, atol=1e-6):
        """Saves `model` to a `.keras` file and loads it back.

        The loaded model must give the same outputs and hold the same
        weights.

        Returns:
            The loaded model.
        """
        path = os.path.join(self.get_temp_dir(), "model.keras")
        expected = model(input_data)
        model.save(path)
        restored = keras.saving.load_model(path)
        self.assertAllClose(restored(input_data), expected, atol=atol)
        self.assertEqual(len(restored.weights), len(model.weights))
        for weight, restored_weight in zip(model.weights, restored.weights):
            self.assertEqual(weight.path, restored_weight.path)
            self.assertAllClose(weight, restored_weight, atol=0, rtol=0)
        return restored
