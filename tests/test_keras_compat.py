"""The private Keras API keras_bidora uses, on the installed Keras.

`check()` must pass; each accessor must do what Keras does with the
attribute; and when an attribute disappears or changes, `check()` must say
which one, and which Keras version, in its error.
"""

import inspect
import os
import re
from unittest import mock

import keras
import keras_hub
import numpy as np
from keras import ops

import keras_bidora
from keras_bidora import _keras_compat
from tests.test_case import TestCase
from tests.test_case import to_numpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(4, name="first")
        self.second = keras.layers.Dense(4, name="second")

    def call(self, x):
        return self.second(self.first(x))


def _block_model():
    inputs = keras.Input((3,), name="x")
    block = Block(name="block")
    head = keras.layers.Dense(1, name="head")
    model = keras.Model(inputs, head(block(inputs)), name="model")
    return model, block, head


def _compiled_model():
    model, _, _ = _block_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = np.arange(12, dtype="float32").reshape(4, 3) / 10
    y = np.ones((4, 1), dtype="float32")
    return model, x, y


def _removed(cls, name):
    """Removes `cls.<name>` from every class of its MRO for a `with`."""
    owners = [c for c in cls.__mro__ if name in vars(c)]
    patches = [mock.patch.object(owner, name) for owner in owners]

    class Removed:
        def __enter__(self):
            for owner, patch in zip(owners, patches):
                patch.start()
                delattr(owner, name)

        def __exit__(self, *exc_info):
            for patch in reversed(patches):
                patch.stop()

    return Removed()


def _next_minor(version):
    major, minor = version.split(".")
    return f"{major}.{int(minor) + 1}"


class KerasCompatTest(TestCase):
    def test_check_passes(self):
        _keras_compat.check()
        # The probes are named: users' automatic layer names do not shift.
        self.assertEqual(keras.layers.Dense(1).name, "dense")

    def test_installed_versions_are_the_tested_ones(self):
        self.assertTrue(
            keras.__version__.startswith(_keras_compat.TESTED_KERAS + "."),
            keras.__version__,
        )
        self.assertTrue(
            keras_hub.__version__.startswith(
                _keras_compat.TESTED_KERAS_HUB + "."
            ),
            keras_hub.__version__,
        )

    def test_pyproject_bounds_match_the_tested_versions(self):
        # Read as text: `tomllib` needs Python 3.11.
        with open(os.path.join(REPO, "pyproject.toml")) as file:
            pyproject = file.read()
        for name, tested in [
            ("keras", _keras_compat.TESTED_KERAS),
            ("keras-hub", _keras_compat.TESTED_KERAS_HUB),
        ]:
            self.assertIn(
                f'"{name}>={tested},<{_next_minor(tested)}"', pyproject
            )

    # Accessors ---------------------------------------------------------------

    def test_flatten_layers(self):
        model, block, head = _block_model()
        by_hand = [model.layers[0], block, block.first, block.second, head]
        layers = _keras_compat.flatten_layers(model)
        self.assertCountEqual(layers, by_hand)
        self.assertEqual(len(layers), len(by_hand))
        with_self = _keras_compat.flatten_layers(model, include_self=True)
        self.assertIs(with_self[0], model)
        self.assertCountEqual(with_self[1:], by_hand)

    def test_flatten_layers_lists_a_shared_layer_once(self):
        shared = keras.layers.Dense(3, name="shared")
        inputs = keras.Input((3,), name="x")
        model = keras.Model(inputs, shared(shared(inputs)))
        self.assertEqual(
            _keras_compat.flatten_layers(model), [model.layers[0], shared]
        )

    def test_direct_sublayers(self):
        model, block, _ = _block_model()
        self.assertEqual(
            list(_keras_compat.direct_sublayers(block)),
            [block.first, block.second],
        )
        self.assertEqual(
            list(_keras_compat.direct_sublayers(model)), model.layers
        )

    def test_set_parent_path(self):
        dense = keras.layers.Dense(2, name="dense")
        _keras_compat.set_parent_path(dense, "outer/inner")
        dense.build((None, 3))
        self.assertEqual(dense.kernel.path, "outer/inner/dense/kernel")

    def test_unlocked_tracker(self):
        dense = keras.layers.Dense(2)
        dense.build((None, 3))
        with self.assertRaisesRegex(ValueError, "state"):
            dense.extra = keras.layers.Dense(1)
        with _keras_compat.unlocked_tracker(dense):
            dense.extra = keras.layers.Dense(1)
        self.assertIs(_keras_compat.direct_sublayers(dense)[0], dense.extra)
        # Locked again afterwards.
        with self.assertRaisesRegex(ValueError, "state"):
            dense.other = keras.layers.Dense(1)

    def test_replace_tracked_layer(self):
        _, block, _ = _block_model()
        new = keras.layers.Dense(4, name="new")
        with _keras_compat.unlocked_tracker(block):
            _keras_compat.replace_tracked_layer(block, block.first, new)
        self.assertEqual(
            list(_keras_compat.direct_sublayers(block)), [new, block.second]
        )

    def test_replace_in_graph(self):
        inputs = keras.Input((3,), name="x")
        old = keras.layers.Dense(2, name="old")
        head = keras.layers.Dense(1, name="head")
        model = keras.Model(inputs, head(old(inputs)))
        new = keras.layers.Dense(2, name="new")
        new.build((None, 3))
        _keras_compat.replace_in_graph(old, new)
        x = np.arange(6, dtype="float32").reshape(2, 3)
        self.assertAllClose(model(x), head(new(x)))
        self.assertNotAllClose(model(x), head(old(x)))

    def test_retrack_torch_variables(self):
        if keras.config.backend() != "torch":
            self.skipTest("Only torch layers cache their variables.")
        inputs = keras.Input((3,), name="x")
        dense = keras.layers.Dense(2, name="dense")
        model = keras.Model(inputs, dense(inputs))
        with _keras_compat.unlocked_tracker(dense):
            extra = dense.add_weight(shape=(1,), name="extra")
        # The model's cache predates the new variable.
        self.assertFalse(any(p is extra.value for p in model.parameters()))
        _keras_compat.retrack_torch_variables(model)
        self.assertTrue(any(p is extra.value for p in model.parameters()))

    def test_layouts(self):
        if keras.config.backend() != "jax":
            self.skipTest("keras_bidora distributes with JAX only.")
        devices = keras.distribution.list_devices()[:1]
        mesh = keras.distribution.DeviceMesh((1,), ["model"], devices)
        layouts = keras.distribution.LayoutMap(mesh)
        distribution = keras.distribution.ModelParallel(layout_map=layouts)
        self.assertIs(_keras_compat.layout_map(distribution), layouts)
        self.assertIsNone(
            _keras_compat.layout_map(
                keras.distribution.DataParallel(devices=devices)
            )
        )
        variable = keras.Variable(np.ones((2, 2)), name="v")
        layout = keras.distribution.TensorLayout((None, "model"), mesh)
        _keras_compat.set_variable_layout(variable, layout)
        self.assertIs(distribution.get_variable_layout(variable), layout)

    def test_default_optimizer(self):
        lower = keras.optimizers.AdamW(1e-3)
        upper = keras.optimizers.SGD(1e-2)
        multi = keras.optimizers.MultiOptimizer(
            keras.optimizers.OptimizerMap(lower, {"magnitude": upper})
        )
        self.assertIs(_keras_compat.default_optimizer(multi), lower)

    def test_learning_rate_variable(self):
        optimizer = keras.optimizers.AdamW(0.25)
        variable = _keras_compat.learning_rate_variable(optimizer)
        self.assertIsInstance(variable, keras.Variable)
        self.assertAllClose(variable, 0.25)
        self.assertTrue(any(v is variable for v in optimizer.variables))
        schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
        self.assertIsNone(
            _keras_compat.learning_rate_variable(
                keras.optimizers.AdamW(schedule)
            )
        )

    def test_symbolic_build(self):
        model, x, y = _compiled_model()
        self.assertFalse(model.optimizer.built)
        _keras_compat.symbolic_build(model, (x, y))
        self.assertTrue(model.optimizer.built)
        self.assertTrue(all(layer.built for layer in model.layers))

    def test_aggregate_additional_loss(self):
        model, _, _ = _compiled_model()
        loss = _keras_compat.aggregate_additional_loss(
            model, ops.convert_to_tensor([1, 2], dtype="int32")
        )
        self.assertDTypeEqual(loss, keras.config.floatx())
        self.assertAllClose(loss, 3.0)

    def test_loss_tracker(self):
        model, x, y = _compiled_model()
        tracker = _keras_compat.loss_tracker(model)
        self.assertIsInstance(tracker, keras.metrics.Mean)
        logs = model.evaluate(x, y, verbose=0, return_dict=True)
        self.assertAllClose(to_numpy(tracker.result()), logs["loss"])

    def test_dequantized_kernel(self):
        # Keras's own int4 forward pass (no input quantization) is x @ W0.
        x = np.random.default_rng(0).normal(size=(2, 4, 6)).astype("float32")
        for block_size in (-1, 2):
            layer = keras.layers.EinsumDense("abc,cde->abde", (None, 2, 3))
            layer.build((None, 4, 6))
            layer.quantize(
                "int4",
                config=keras.quantizers.Int4QuantizationConfig(
                    block_size=block_size
                ),
            )
            kernel = _keras_compat.dequantized_kernel(layer, "float32")
            self.assertEqual(tuple(kernel.shape), (6, 2, 3))
            self.assertAllClose(
                ops.einsum("abc,cde->abde", x, kernel),
                layer(x),
                atol=1e-5,
                rtol=1e-5,
            )

    def test_overridden_methods_are_overridden_with_keras_signature(self):
        for name, (_, keywords) in _keras_compat.OVERRIDDEN_METHODS.items():
            self.assertIn(name, vars(keras_bidora.BiDoRAModel))
            parameters = inspect.signature(
                getattr(keras_bidora.BiDoRAModel, name)
            ).parameters
            for keyword in keywords:
                self.assertIn(keyword, parameters)

    # Failures ----------------------------------------------------------------

    def assertCheckFails(self, attribute, *fragments):
        with mock.patch.object(keras, "__version__", "3.99.0"):
            with self.assertRaises(RuntimeError) as context:
                _keras_compat.check()
        message = str(context.exception)
        self.assertIn(f"`{attribute}`", message)
        self.assertIn("Keras 3.99.0", message)
        self.assertIn(f"keras {_keras_compat.TESTED_KERAS}.x", message)
        self.assertIn(f"keras-hub {_keras_compat.TESTED_KERAS_HUB}.x", message)
        for fragment in fragments:
            self.assertRegex(message, re.escape(fragment))

    def test_check_names_a_removed_method(self):
        with _removed(keras.Model, "_symbolic_build"):
            self.assertFalse(hasattr(keras.Model, "_symbolic_build"))
            self.assertCheckFails("Model._symbolic_build", "does not have")
        self.assertTrue(hasattr(keras.Model, "_symbolic_build"))

    def test_check_names_a_removed_quantization_method(self):
        name = "_adjust_scale_for_dequant"
        with _removed(keras.layers.EinsumDense, name):
            self.assertCheckFails(f"EinsumDense.{name}", "does not have")

    def test_check_names_a_changed_dequantization(self):
        def doubled(layer, dtype):
            return 2 * dequantized_kernel(layer, dtype)

        dequantized_kernel = _keras_compat.dequantized_kernel
        with mock.patch.object(_keras_compat, "dequantized_kernel", doubled):
            self.assertCheckFails("EinsumDense.kernel_scale", "has changed")

    def test_check_names_a_changed_signature(self):
        def symbolic_build(self, iterator=None):
            pass

        with mock.patch.object(keras.Model, "_symbolic_build", symbolic_build):
            self.assertCheckFails(
                "Model._symbolic_build", "has changed", "data_batch"
            )

    def test_check_names_a_removed_overridden_method(self):
        overridden = [
            name
            for name, (backends, _) in _keras_compat.OVERRIDDEN_METHODS.items()
            if keras.config.backend() in backends
        ]
        if not overridden:
            self.skipTest("This backend's trainer has no method overridden.")
        for name in overridden:
            with _removed(keras.Model, name):
                self.assertCheckFails(f"Model.{name}", "does not have")

    def test_check_names_a_removed_instance_attribute(self):
        compile = keras.Model.compile

        def compile_without_tracker(self, *args, **kwargs):
            compile(self, *args, **kwargs)
            del self._loss_tracker

        with mock.patch.object(keras.Model, "compile", compile_without_tracker):
            self.assertCheckFails("Model._loss_tracker", "does not have")
