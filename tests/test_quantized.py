"""BiDoRA on int8 and int4 quantized bases (`layer.quantize(mode)`).

The references are independent of the code under test: `W0` is
dequantized here in NumPy from the integers and scales Keras stores (per
output unit for int8 and per-channel int4, per block of rows with a zero
point for sub-channel int4), and the outputs are checked against the NumPy
DoRA formula of `tests/test_bidora_dense.py` or against the quantized base
model's own outputs.
"""

import os

import keras
import keras_hub
import numpy as np
import pytest
from absl.testing import parameterized
from keras import ops

import keras_bidora
from keras_bidora import config
from keras_bidora.layers.bidora_dense import adapted_layers
from tests.test_bidora_dense import ALPHA
from tests.test_bidora_dense import CASES
from tests.test_bidora_dense import RANK
from tests.test_bidora_dense import check_adapter_gradients
from tests.test_bidora_dense import check_numpy_reference
from tests.test_bidora_dense import make_base
from tests.test_bidora_dense import make_inputs
from tests.test_bidora_dense import numpy_output
from tests.test_bidora_dense import randomize_adapter
from tests.test_case import TestCase
from tests.test_case import to_numpy
from tests.test_saving import randomize_adapters

BLOCK_SIZE = 2
# `(mode, int4 block size)`; -1 is per-channel int4.
MODES = {
    "int8": ("int8", None),
    "int4": ("int4", -1),
    "int4_blocks": ("int4", BLOCK_SIZE),
}
# One Dense, one EinsumDense (BERT's query: kernel (hidden, heads, dim)).
LAYOUTS = ("dense", "bert_qkv")


def quantize(layer, mode):
    mode, block_size = MODES[mode]
    quantization_config = None
    if mode == "int4":
        quantization_config = keras.quantizers.Int4QuantizationConfig(
            block_size=block_size
        )
    layer.quantize(mode, config=quantization_config)


def numpy_dequantized(layer, mode):
    """`W0` from the stored integers and scales, in float64.

    In both layouts the input axis comes first in the kernel, so the
    kernel reads as a (rows, units) matrix with the units last.
    """
    values = to_numpy(layer.kernel).astype("float64")
    scale = to_numpy(layer.kernel_scale).astype("float64")
    shape = values.shape
    matrix = values.reshape(shape[0], -1)
    if MODES[mode][1] in (None, -1):
        matrix = matrix / scale.reshape(1, -1)
    else:
        groups = np.arange(shape[0]) // BLOCK_SIZE
        zero = to_numpy(layer.kernel_zero).astype("float64")
        matrix = (matrix - zero[groups]) * scale[groups]
    return matrix.reshape(shape)


def named(*modes, orders=("before", "after")):
    return [
        dict(
            testcase_name=f"{layout}_{mode}_{order}",
            layout=layout,
            mode=mode,
            order=order,
        )
        for layout in LAYOUTS
        for mode in modes or tuple(MODES)
        for order in orders
    ]


def adapted(layout, mode, order):
    """A BiDoRADense on a base quantized before or after it is made."""
    base = make_base(layout)
    float_kernel = to_numpy(base.kernel).astype("float64")
    if order == "before":
        quantize(base, mode)
    layer = keras_bidora.BiDoRADense(base, rank=RANK, alpha=ALPHA)
    layer.build()
    if order == "after":
        quantize(base, mode)
    return layer, float_kernel


def numpy_values(layer, mode):
    as64 = lambda v: to_numpy(v).astype("float64")  # noqa: E731
    return dict(
        kernel=numpy_dequantized(layer.layer, mode),
        bias=None if layer.layer.bias is None else as64(layer.layer.bias),
        lora_a=as64(layer.lora_a),
        lora_b=as64(layer.lora_b),
        magnitude=as64(layer.magnitude),
    )


class QuantizedLayerTest(TestCase):
    def setUp(self):
        # Fixed random weights: the tolerances are set for the
        # quantization error, which varies with them.
        super().setUp()
        keras.utils.set_random_seed(0)

    @parameterized.named_parameters(named())
    def test_matches_numpy_reference(self, layout, mode, order):
        layer, float_kernel = adapted(layout, mode, order)
        randomize_adapter(layer)
        x = make_inputs(layout)
        values = numpy_values(layer, mode)
        self.assertEqual(layer.layer.quantization_mode, MODES[mode][0])
        if MODES[mode][1] in (None, -1):
            # The dequantized kernel is the float one, to a quantization
            # step (abs-max over each unit's column: 127 or 7 levels).
            levels = 127 if mode == "int8" else 7
            column_max = np.abs(float_kernel).reshape(float_kernel.shape[0], -1)
            step = column_max.max(axis=0) / levels
            error = np.abs(values["kernel"] - float_kernel).reshape(
                float_kernel.shape[0], -1
            )
            self.assertTrue(np.all(error <= step + 1e-6))

        check_numpy_reference(self, layer, x, values, layout, atol=1e-4)

    @parameterized.named_parameters(named(orders=("before",)))
    def test_equals_quantized_base_at_init(self, layout, mode, order):
        layer, _ = adapted(layout, mode, order)
        x = make_inputs(layout)
        expected = to_numpy(layer.layer(x))
        # An int8 base also quantizes its inputs (per row, 127 levels);
        # int4 bases do not.
        atol = 2e-2 * np.abs(expected).max() if mode == "int8" else 1e-5
        self.assertAllClose(layer(x), expected, atol=atol, rtol=0)
        norms = np.linalg.norm(
            numpy_dequantized(layer.layer, mode).reshape(
                CASES[layout]["input_shape"][-1], -1
            ),
            axis=0,
        )
        self.assertAllClose(
            to_numpy(layer.magnitude).reshape(-1), norms, atol=1e-5
        )

    @parameterized.named_parameters(
        # Each layout, mode and order once.
        ("dense_int8_after", "dense", "int8", "after"),
        ("dense_int4_blocks_before", "dense", "int4_blocks", "before"),
        ("bert_qkv_int8_before", "bert_qkv", "int8", "before"),
        ("bert_qkv_int4_blocks_after", "bert_qkv", "int4_blocks", "after"),
    )
    def test_gradients_reach_only_adapters(self, layout, mode, order):
        layer, _ = adapted(layout, mode, order)
        randomize_adapter(layer)
        x = make_inputs(layout)

        # W0 is held only as integers and scales: no float kernel variable.
        self.assertEqual(
            sorted(w.name for w in layer.trainable_weights),
            ["lora_a", "lora_b", "magnitude"],
        )
        stored = {w.name: w.dtype for w in layer.non_trainable_weights}
        self.assertEqual(stored["kernel"], "int8")
        self.assertIn("kernel_scale", stored)
        self.assertFalse(
            any(w.trainable for w in layer.layer.weights),
            msg="a base variable is trainable",
        )

        check_adapter_gradients(
            self, layer, x, numpy_values(layer, mode), layout
        )
        # Nor is a dequantized copy kept between calls (eager torch keeps
        # a float W0's matrix and norms, not a quantized one's).
        layer(x)
        self.assertIsNone(layer._frozen_cache)

    def test_compute_dtype_follows_the_policy(self):
        layout, mode = "bert_qkv", "int8"
        x = make_inputs(layout)
        keras.config.set_dtype_policy("mixed_bfloat16")
        try:
            layer, _ = adapted(layout, mode, "before")
        finally:
            keras.config.set_dtype_policy("float32")
        output = layer(x)
        self.assertDTypeEqual(output, "bfloat16")
        self.assertEqual(layer.dtype_policy.name, "mixed_bfloat16")
        for variable in (layer.magnitude, layer.lora_a, layer.lora_b):
            self.assertEqual(variable.dtype, "float32")
        values = numpy_values(layer, mode)
        self.assertAllClose(
            ops.cast(output, "float32"),
            numpy_output(x, values, layout),
            atol=5e-2,
            rtol=5e-2,
        )

    @parameterized.named_parameters(
        ("int8", "int8"), ("int4_blocks", "int4_blocks")
    )
    def test_merged_layer_is_float(self, mode):
        layout = "bert_qkv"
        layer, _ = adapted(layout, mode, "before")
        randomize_adapter(layer)
        x = make_inputs(layout)
        expected = numpy_output(x, numpy_values(layer, mode), layout)

        merged = layer.merged_layer()
        self.assertIsNone(merged.quantization_mode)
        self.assertEqual(merged.kernel.dtype, "float32")
        self.assertAllClose(merged(x), expected, atol=1e-4, rtol=1e-4)

    def test_functional_model_saving(self):
        layout, mode = "bert_qkv", "int4_blocks"
        layer, _ = adapted(layout, mode, "before")
        randomize_adapter(layer)
        x = make_inputs(layout)
        inputs = keras.Input(shape=x.shape[1:])
        model = keras.Model(inputs, keras.layers.Dense(2)(layer(inputs)))
        restored = self.run_model_saving_test(model, x, atol=1e-5)
        restored_layer = restored.get_layer(layer.name)
        self.assertEqual(restored_layer.layer.quantization_mode, "int4")


def quantization_config(mode):
    """A Keras config for each mode BiDoRADense does not adapt."""
    if mode == "float8":
        return keras.quantizers.Float8QuantizationConfig()
    # GPTQ and AWQ calibrate on data only in `Model.quantize`; a layer
    # takes their variables without it.
    config_class = {
        "gptq": keras.quantizers.GPTQConfig,
        "awq": keras.quantizers.AWQConfig,
    }[mode]
    return config_class(dataset=["a b"], tokenizer=lambda text: [1, 2])


class UnsupportedModeTest(TestCase):
    def test_modes_are_declared_once(self):
        self.assertEqual(config.QUANTIZATION_MODES, ("int8", "int4"))

    @parameterized.named_parameters(
        ("float8", "float8"), ("gptq", "gptq"), ("awq", "awq")
    )
    def test_base_is_refused(self, mode):
        base = make_base("dense")
        base.quantize(config=quantization_config(mode))
        with pytest.raises(ValueError) as error:
            keras_bidora.BiDoRADense(base)
        self.assertIn(f"quantization_mode={mode!r}", str(error.value))
        self.assertIn("('int8', 'int4')", str(error.value))

    def test_inject_refuses_float8_before_changing_anything(self):
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(4, name="query")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(2, name="value")(hidden))
        model.get_layer("value").quantize("float8")
        weights = [id(w) for w in model.weights]
        trainable = [id(w) for w in model.trainable_weights]
        with pytest.raises(ValueError, match="quantization_mode='float8'"):
            keras_bidora.inject(model, rank=2, targets=["query", "value"])
        self.assertEqual(adapted_layers(model), [])
        self.assertEqual([id(w) for w in model.weights], weights)
        self.assertEqual([id(w) for w in model.trainable_weights], trainable)

    def test_base_quantized_to_float8_after_injection(self):
        base = make_base("dense")
        layer = keras_bidora.BiDoRADense(base, rank=RANK)
        layer.build()
        base.quantize("float8")
        with pytest.raises(ValueError, match="quantization_mode='float8'"):
            layer(make_inputs("dense"))

    @parameterized.named_parameters(
        ("float8", "float8"), ("gptq", "gptq"), ("awq", "awq")
    )
    def test_model_quantize_and_merge_refuse(self, mode):
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(4, name="query")(inputs)
        base = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
        bidora = keras_bidora.BiDoRAModel(base, rank=2, targets=["query"])
        weights = [id(w) for w in bidora.weights]
        with pytest.raises(ValueError) as error:
            bidora.quantize(config=quantization_config(mode))
        self.assertIn(f"mode={mode!r}", str(error.value))
        self.assertIn("('int8', 'int4')", str(error.value))
        self.assertEqual([id(w) for w in bidora.weights], weights)
        self.assertFalse(
            any(layer.quantization_mode for layer in bidora.model.layers)
        )
        self.assertIsNone(adapted_layers(bidora)[0].layer.quantization_mode)
        with pytest.raises(ValueError, match=f"quantize={mode!r}"):
            keras_bidora.merge(bidora, quantize=mode)


# A tiny BERT classifier -------------------------------------------------

SEQUENCE_LENGTH = 8


def tiny_task():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=SEQUENCE_LENGTH,
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None
    )


def bidora_task(quantize_first=None):
    task = tiny_task()
    if quantize_first is not None:
        task.backbone.quantize(quantize_first)
    return keras_bidora.BiDoRAModel(task, rank=2), task


def task_data(size=24, seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, SEQUENCE_LENGTH)
    x = {
        "token_ids": rng.integers(1, 50, shape).astype("int32"),
        "segment_ids": np.zeros(shape, "int32"),
        "padding_mask": np.ones(shape, "int32"),
    }
    return x, rng.integers(0, 2, (size,))


def trained_variables(model):
    """Adapter, magnitude and task-head variables: the ones fit may move."""
    return {
        v.path
        for v in model.trainable_variables
        if v.path.endswith(("lora_a", "lora_b", "magnitude"))
        or v.path.startswith("logits/")
    }


def compile_task(model):
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


class QuantizedModelTest(TestCase):
    def setUp(self):
        # Fixed random weights: the tolerances are set for the
        # quantization error, which varies with them.
        super().setUp()
        keras.utils.set_random_seed(0)

    def assertMerges(self, bidora, x):
        """`merge` gives a float copy, or a requantized one on request,
        each within the quantization error of the adapted model."""
        expected = to_numpy(bidora(x))
        scale = np.abs(expected).max()
        merged = keras_bidora.merge(bidora)
        self.assertFalse(
            any(layer.quantization_mode for layer in merged.backbone.layers)
        )
        self.assertTrue(all("int" not in w.dtype for w in merged.weights))
        self.assertAllClose(merged(x), expected, atol=1e-2 * scale, rtol=0)
        requantized = keras_bidora.merge(bidora, quantize="int8")
        query = requantized.backbone.get_layer(
            "transformer_layer_0"
        )._self_attention_layer._query_dense
        self.assertEqual(query.quantization_mode, "int8")
        self.assertAllClose(requantized(x), expected, atol=5e-2 * scale, rtol=0)

    def test_inject_then_quantize_fit_save_resume(self):
        x, y = task_data()
        bidora, task = bidora_task()
        bidora.quantize("int8")
        for layer in adapted_layers(bidora.model):
            self.assertEqual(layer.layer.quantization_mode, "int8")
        # The frozen layers only: the task's head stays float and trains.
        self.assertIsNone(task.get_layer("logits").quantization_mode)
        self.assertEqual(
            {v.path for v in bidora.trainable_variables},
            trained_variables(bidora),
        )

        # A bi-level fit moves only the adapters, magnitudes and the head.
        compile_task(bidora)
        before = {v.path: to_numpy(v).copy() for v in bidora.weights}
        bidora.fit(x, y, batch_size=8, epochs=1, verbose=0)
        moved = trained_variables(bidora)
        for variable in bidora.weights:
            if variable.path in moved:
                self.assertNotAllClose(
                    before[variable.path], variable, msg=variable.path
                )
            else:
                self.assertAllClose(
                    before[variable.path],
                    variable,
                    atol=0,
                    rtol=0,
                    msg=variable.path,
                )

        # A `.keras` round trip keeps the quantized layers and the outputs,
        # and training resumes.
        restored = self.run_model_saving_test(bidora, x, atol=1e-6)
        for layer in adapted_layers(restored.model):
            self.assertEqual(layer.layer.quantization_mode, "int8")
        self.assertEqual(
            int(restored.optimizer.iterations),
            int(bidora.optimizer.iterations),
        )
        restored_before = {
            v.path: to_numpy(v).copy() for v in restored.trainable_variables
        }
        restored.fit(x, y, batch_size=8, epochs=1, verbose=0)
        for variable in restored.trainable_variables:
            self.assertNotAllClose(
                restored_before[variable.path], variable, msg=variable.path
            )

    def test_inject_then_quantize_the_backbone_reloads(self):
        # The case: `.keras` files of a model quantized through its
        # backbone after the injection did not load.
        x, _ = task_data(size=4)
        bidora, task = bidora_task()
        task.backbone.quantize("int4")
        randomize_adapters(bidora)
        path = os.path.join(self.get_temp_dir(), "model.keras")
        bidora.save(path)
        restored = keras.saving.load_model(path)
        self.assertAllClose(restored(x), bidora(x), atol=1e-6)
        for layer in adapted_layers(restored.model):
            self.assertEqual(layer.layer.quantization_mode, "int4")

    def test_quantize_then_inject(self):
        x, _ = task_data(size=4)
        task = tiny_task()
        task.backbone.quantize("int8")
        base_output = to_numpy(task(x))
        bidora = keras_bidora.BiDoRAModel(task, rank=2)
        # At init the adapted model computes the quantized base's output, up
        # to the inputs the int8 query and value quantize and it does not
        # (per-row int8 inputs: about 1% of the output's scale, up to 2%
        # seen with other random weights).
        self.assertAllClose(
            bidora(x), base_output, atol=5e-2 * np.abs(base_output).max()
        )
        for layer in adapted_layers(bidora.model):
            self.assertEqual(layer.layer.quantization_mode, "int8")
        randomize_adapters(bidora)
        self.assertNotAllClose(bidora(x), base_output)

        path = os.path.join(self.get_temp_dir(), "model.keras")
        bidora.save(path)
        restored = keras.saving.load_model(path)
        self.assertAllClose(restored(x), bidora(x), atol=1e-6)
        self.assertMerges(bidora, x)
