import json
import math
from unittest import mock

import keras
import numpy as np
import pytest
from absl.testing import parameterized
from keras import ops

from keras_bidora import BiDoRADense
from keras_bidora import direction_regularization
from keras_bidora.layers import bidora_dense
from keras_bidora.layers.bidora_dense import shared_column_scales
from tests.test_case import TestCase
from tests.test_case import gradients
from tests.test_case import to_numpy

RANK = 2
ALPHA = 3.0

# Each case names the kernel axes contracted with the input (`in_axes`) and
# the others (`out_axes`) by hand, so the NumPy reference does not share the
# layer's equation parsing.
CASES = {
    "dense": dict(
        equation=None,
        units=6,
        input_shape=(3, 5),
        in_axes=(0,),
        out_axes=(1,),
    ),
    "dense_bias_activation": dict(
        equation=None,
        units=4,
        activation="tanh",
        input_shape=(2, 3, 5),
        in_axes=(0,),
        out_axes=(1,),
    ),
    # BERT query/key/value: kernel (hidden, heads, head_dim).
    "bert_qkv": dict(
        equation="abc,cde->abde",
        output_shape=(None, 2, 3),
        input_shape=(2, 4, 5),
        in_axes=(0,),
        out_axes=(1, 2),
    ),
    # Attention output: kernel (heads, head_dim, hidden).
    "attention_output": dict(
        equation="abcd,cde->abe",
        output_shape=(None, 5),
        input_shape=(2, 4, 2, 3),
        in_axes=(0, 1),
        out_axes=(2,),
    ),
    # Gemma query: kernel (heads, hidden, head_dim), in axis in the middle.
    "gemma_query": dict(
        equation="btd,ndh->btnh",
        output_shape=(None, 2, 3),
        input_shape=(2, 4, 5),
        in_axes=(1,),
        out_axes=(0, 2),
    ),
    # Heads before time in the output: not a matrix product's axes, so the
    # layer goes through the equation instead.
    "heads_first_output": dict(
        equation="btd,ndh->bnth",
        output_shape=(2, None, 3),
        bias_axes="nh",
        input_shape=(2, 4, 5),
        in_axes=(1,),
        out_axes=(0, 2),
    ),
    "einsum_bias_activation": dict(
        equation="btd,ndh->btnh",
        output_shape=(None, 2, 3),
        bias_axes="nh",
        activation="tanh",
        input_shape=(2, 4, 5),
        in_axes=(1,),
        out_axes=(0, 2),
    ),
}

NUMPY_ACTIVATIONS = {None: lambda y: y, "tanh": np.tanh}


def named_cases(*names):
    names = names or tuple(CASES)
    return [dict(testcase_name=name, case=name) for name in names]


def make_base(case, seed=0):
    """A built Dense/EinsumDense with random kernel and bias."""
    case = CASES[case]
    if case["equation"] is None:
        base = keras.layers.Dense(
            case["units"], activation=case.get("activation")
        )
    else:
        base = keras.layers.EinsumDense(
            case["equation"],
            case["output_shape"],
            bias_axes=case.get("bias_axes"),
            activation=case.get("activation"),
        )
    base.build((None,) + case["input_shape"][1:])
    rng = np.random.default_rng(seed)
    base.kernel.assign(rng.normal(size=base.kernel.shape).astype("float32"))
    if base.bias is not None:
        base.bias.assign(rng.normal(size=base.bias.shape).astype("float32"))
    return base


def make_inputs(case, seed=1):
    shape = CASES[case]["input_shape"]
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def randomize_adapter(layer, seed=2):
    """Moves B off zero and gives every adapter variable a random value."""
    rng = np.random.default_rng(seed)
    for variable in (layer.lora_a, layer.lora_b):
        variable.assign(0.5 * rng.normal(size=variable.shape).astype("float32"))
    if layer.magnitude is not None:
        layer.magnitude.assign(
            rng.uniform(0.5, 1.5, size=layer.magnitude.shape).astype("float32")
        )


def random_layer(case, seed, rank=RANK, **kwargs):
    """A built `BiDoRADense` on `make_base(case, seed)`, every adapter
    variable random (`randomize_adapter` with the same seed)."""
    layer = BiDoRADense(
        make_base(case, seed=seed), rank=rank, alpha=ALPHA, **kwargs
    )
    layer.build()
    randomize_adapter(layer, seed=seed)
    return layer


def numpy_variables(layer):
    """The values the NumPy reference needs, in float64."""
    as64 = lambda v: None if v is None else to_numpy(v).astype("float64")  # noqa: E731
    return dict(
        kernel=as64(layer.layer.kernel),
        bias=as64(layer.layer.bias),
        lora_a=as64(layer.lora_a),
        lora_b=as64(layer.lora_b),
        magnitude=as64(layer.magnitude),
    )


def numpy_direction(kernel, lora_a, lora_b, case, scale=ALPHA / RANK):
    """`W0 + s * A @ B` as an (in, out) matrix, from the kernel's axes."""
    case = CASES[case]
    perm = list(case["in_axes"]) + list(case["out_axes"])
    in_units = math.prod(kernel.shape[i] for i in case["in_axes"])
    matrix = np.transpose(kernel, perm).reshape(in_units, -1)
    return matrix + scale * lora_a @ lora_b


def numpy_merged_kernel(
    kernel, lora_a, lora_b, magnitude, case, norm=None, scale=ALPHA / RANK
):
    """NumPy DoRA kernel W' (or LoRA W0 + sAB if `magnitude` is None).

    `norm` replaces the column norm, for the detached-norm gradient.
    """
    spec = CASES[case]
    direction = numpy_direction(kernel, lora_a, lora_b, case, scale)
    if magnitude is not None:
        if norm is None:
            norm = np.linalg.norm(direction, axis=0)
        direction = magnitude.reshape(-1) * direction / norm
    perm = list(spec["in_axes"]) + list(spec["out_axes"])
    direction = direction.reshape([kernel.shape[i] for i in perm])
    return np.transpose(direction, np.argsort(perm))


def numpy_forward(x, kernel, bias, case):
    spec = CASES[case]
    equation = spec["equation"] or "...a,ab->...b"
    y = np.einsum(equation, x.astype("float64"), kernel)
    if bias is not None:
        y = y + bias
    return NUMPY_ACTIVATIONS[spec.get("activation")](y)


def numpy_output(x, values, case, norm=None):
    kernel = numpy_merged_kernel(
        values["kernel"],
        values["lora_a"],
        values["lora_b"],
        values["magnitude"],
        case,
        norm=norm,
    )
    return numpy_forward(x, kernel, values["bias"], case)


def numpy_penalty(values, case, scale=ALPHA / RANK):
    """`||V^T V - I||_F` with V the column-normalised `W0 + s*A@B`."""
    direction = numpy_direction(
        values["kernel"], values["lora_a"], values["lora_b"], case, scale
    )
    direction = direction / np.linalg.norm(direction, axis=0)
    gram = direction.T @ direction
    return np.linalg.norm(gram - np.eye(gram.shape[0]))


def numeric_gradients(loss_fn, values, names, epsilon=1e-6):
    """Central finite differences of `loss_fn(values)` in float64."""
    grads = []
    for name in names:
        grad = np.zeros_like(values[name])
        for index in np.ndindex(grad.shape):
            shifted = {
                k: None if v is None else v.copy() for k, v in values.items()
            }
            shifted[name][index] += epsilon
            up = loss_fn(shifted)
            shifted[name][index] -= 2 * epsilon
            down = loss_fn(shifted)
            grad[index] = (up - down) / (2 * epsilon)
        grads.append(grad)
    return grads


def pairwise_norm(values, case):
    return np.linalg.norm(
        numpy_direction(
            values["kernel"], values["lora_a"], values["lora_b"], case
        ),
        axis=0,
    )


def check_numpy_reference(test, layer, x, values, case, atol=1e-5):
    """`layer`'s output, direction and column scale against NumPy's."""
    test.assertAllClose(
        layer(x), numpy_output(x, values, case), atol=atol, rtol=atol
    )
    direction = numpy_direction(
        values["kernel"], values["lora_a"], values["lora_b"], case
    )
    test.assertAllClose(layer.direction_matrix(), direction, atol=1e-5)
    test.assertAllClose(
        layer.column_scale(),
        values["magnitude"].reshape(-1) / np.linalg.norm(direction, axis=0),
        atol=1e-5,
        rtol=1e-5,
    )


def check_adapter_gradients(test, layer, x, values, case):
    """The adapters' gradients against NumPy finite differences.

    Returns:
        The gradients, one NumPy array per adapter variable.
    """
    target = np.random.default_rng(3).normal(size=layer(x).shape)
    variables = [layer.magnitude, layer.lora_a, layer.lora_b]
    grads = gradients(
        lambda: ops.sum(layer(x) * ops.convert_to_tensor(target, "float32")),
        variables,
    )
    expected = numeric_gradients(
        lambda v: np.sum(numpy_output(x, v, case) * target),
        values,
        ["magnitude", "lora_a", "lora_b"],
    )
    for grad, reference in zip(grads, expected):
        test.assertAllClose(grad, reference, atol=1e-3, rtol=1e-3)
    return grads


class BiDoRADenseTest(TestCase):
    def make_layer(self, case, **kwargs):
        kwargs.setdefault("rank", RANK)
        kwargs.setdefault("alpha", ALPHA)
        layer = BiDoRADense(make_base(case), **kwargs)
        layer.build()
        return layer

    @parameterized.named_parameters(named_cases("dense", "bert_qkv"))
    def test_layer_basics(self, case):
        x = make_inputs(case)
        base = make_base(case)

        def layer_fn():
            # Rebuilt under each global policy, as a user would do.
            return BiDoRADense(make_base(case), rank=RANK, alpha=ALPHA)

        self.run_layer_test(
            layer_fn,
            x,
            expected_output_shape=tuple(base(x).shape),
            expected_num_trainable_weights=3,
            expected_num_non_trainable_weights=len(base.weights),
        )

    @parameterized.named_parameters(named_cases())
    def test_matches_numpy_reference(self, case):
        layer = self.make_layer(case)
        randomize_adapter(layer)
        x = make_inputs(case)
        check_numpy_reference(self, layer, x, numpy_variables(layer), case)

    @parameterized.named_parameters(named_cases())
    def test_equals_base_layer_at_init(self, case):
        x = make_inputs(case)
        for magnitude in (True, False):
            base = make_base(case)
            expected = base(x)
            layer = BiDoRADense(
                base, rank=RANK, alpha=ALPHA, magnitude=magnitude
            )
            self.assertAllClose(
                layer(x),
                expected,
                atol=1e-5,
                rtol=1e-5,
                msg=f"magnitude={magnitude}",
            )
            self.assertFalse(np.any(to_numpy(layer.lora_b)))
            self.assertTrue(np.any(to_numpy(layer.lora_a)))
            if magnitude:
                values = numpy_variables(layer)
                spec = CASES[case]
                out_shape = [
                    values["kernel"].shape[i] for i in spec["out_axes"]
                ]
                self.assertEqual(tuple(layer.magnitude.shape), tuple(out_shape))
                self.assertAllClose(
                    layer.magnitude,
                    pairwise_norm(values, case).reshape(out_shape),
                    atol=1e-5,
                )

    @parameterized.named_parameters(named_cases())
    def test_gradients_reach_only_adapter(self, case):
        layer = self.make_layer(case)
        randomize_adapter(layer)
        x = make_inputs(case)

        self.assertEqual(
            sorted(w.name for w in layer.trainable_weights),
            ["lora_a", "lora_b", "magnitude"],
        )
        base = layer.layer
        self.assertEqual(
            {id(w) for w in layer.non_trainable_weights},
            {id(w) for w in base.weights},
        )
        self.assertFalse(base.trainable)

        # Independent reference: finite differences of the NumPy formula.
        grads = check_adapter_gradients(
            self, layer, x, numpy_variables(layer), case
        )
        variables = [layer.magnitude, layer.lora_a, layer.lora_b]
        for variable, grad in zip(variables, grads):
            self.assertEqual(grad.shape, tuple(variable.shape))
            self.assertGreater(np.abs(grad).max(), 1e-4, msg=variable.name)

    @parameterized.named_parameters(named_cases("dense", "gemma_query"))
    def test_detach_norm(self, case):
        x = make_inputs(case)
        exact = self.make_layer(case)
        randomize_adapter(exact)
        detached = BiDoRADense(
            exact.layer, rank=RANK, alpha=ALPHA, detach_norm=True
        )
        detached.build()
        detached.set_weights(exact.get_weights())
        target = np.random.default_rng(3).normal(size=exact(x).shape)

        self.assertAllClose(detached(x), exact(x), atol=1e-6)

        def grads_of(layer):
            return gradients(
                lambda: ops.sum(
                    layer(x) * ops.convert_to_tensor(target, "float32")
                ),
                [layer.magnitude, layer.lora_a, layer.lora_b],
            )

        exact_grads = grads_of(exact)
        detached_grads = grads_of(detached)
        self.assertAllClose(detached_grads[0], exact_grads[0], atol=1e-5)
        self.assertNotAllClose(detached_grads[1], exact_grads[1], atol=1e-3)
        self.assertNotAllClose(detached_grads[2], exact_grads[2], atol=1e-3)

        # The detached gradient treats the current column norm as a constant.
        values = numpy_variables(detached)
        norm = pairwise_norm(values, case)
        expected = numeric_gradients(
            lambda v: np.sum(numpy_output(x, v, case, norm=norm) * target),
            values,
            ["magnitude", "lora_a", "lora_b"],
        )
        for grad, reference in zip(detached_grads, expected):
            self.assertAllClose(grad, reference, atol=1e-3, rtol=1e-3)

    @parameterized.named_parameters(named_cases())
    def test_lora_matches_numpy(self, case):
        layer = self.make_layer(case, magnitude=False)
        self.assertIsNone(layer.magnitude)
        self.assertEqual(
            sorted(w.name for w in layer.trainable_weights),
            ["lora_a", "lora_b"],
        )
        randomize_adapter(layer)
        x = make_inputs(case)
        values = numpy_variables(layer)
        kernel = values["kernel"]
        perm = list(CASES[case]["in_axes"]) + list(CASES[case]["out_axes"])
        update = ALPHA / RANK * values["lora_a"] @ values["lora_b"]
        update = update.reshape([kernel.shape[i] for i in perm])
        expected_kernel = kernel + np.transpose(update, np.argsort(perm))

        self.assertAllClose(
            layer(x),
            numpy_forward(x, expected_kernel, values["bias"], case),
            atol=1e-5,
            rtol=1e-5,
        )
        self.assertAllClose(layer.merged_kernel(), expected_kernel, atol=1e-5)

    @parameterized.named_parameters(named_cases())
    def test_merged_kernel_and_layer(self, case):
        layer = self.make_layer(case)
        randomize_adapter(layer)
        x = make_inputs(case)
        values = numpy_variables(layer)
        expected_kernel = numpy_merged_kernel(
            values["kernel"],
            values["lora_a"],
            values["lora_b"],
            values["magnitude"],
            case,
        )

        merged_kernel = layer.merged_kernel()
        self.assertEqual(tuple(merged_kernel.shape), expected_kernel.shape)
        self.assertAllClose(merged_kernel, expected_kernel, atol=1e-5)

        merged = layer.merged_layer()
        self.assertIs(type(merged), type(layer.layer))
        self.assertIn(
            type(merged), (keras.layers.Dense, keras.layers.EinsumDense)
        )
        self.assertAllClose(merged(x), layer(x), atol=1e-5, rtol=1e-5)
        serialized = json.dumps(keras.saving.serialize_keras_object(merged))
        self.assertNotIn("keras_bidora", serialized)
        self.assertNotIn("BiDoRA", serialized)
        # The wrapped layer's kernel is left as it was.
        self.assertAllClose(layer.layer.kernel, values["kernel"], atol=0)

    def test_config_round_trip(self):
        layer = self.make_layer(
            "gemma_query", dropout=0.25, detach_norm=True, name="query"
        )
        randomize_adapter(layer)
        x = make_inputs("gemma_query")
        config = layer.get_config()
        self.assertEqual(config["rank"], RANK)
        self.assertEqual(config["alpha"], ALPHA)
        self.assertEqual(config["dropout"], 0.25)
        self.assertTrue(config["detach_norm"])
        self.assertTrue(config["magnitude"])
        self.assertEqual(config["name"], "query")
        json.dumps(config)

        restored = BiDoRADense.from_config(config)
        self.assertIsInstance(restored.layer, keras.layers.EinsumDense)
        self.assertTrue(restored.layer.built)
        self.assertEqual(restored.layer.equation, "btd,ndh->btnh")
        restored.build()
        restored.set_weights(layer.get_weights())
        self.assertAllClose(restored(x), layer(x), atol=1e-6)
        self.assertEqual(restored.get_config(), config)

    def test_model_saving(self):
        case = "bert_qkv"
        x = make_inputs(case)
        inputs = keras.Input(shape=x.shape[1:])
        layer = BiDoRADense(make_base(case), rank=RANK, alpha=ALPHA)
        hidden = layer(inputs)
        outputs = keras.layers.Dense(2)(hidden)
        model = keras.Model(inputs, outputs)
        randomize_adapter(layer)

        restored = self.run_model_saving_test(model, x)
        restored_layer = restored.get_layer(layer.name)
        self.assertIsInstance(restored_layer, BiDoRADense)
        for name in ("magnitude", "lora_a", "lora_b"):
            self.assertAllClose(
                getattr(restored_layer, name), getattr(layer, name), atol=0
            )
        self.assertAllClose(
            restored_layer.layer.kernel, layer.layer.kernel, atol=0
        )

    @parameterized.named_parameters(
        ("bfloat16", "mixed_bfloat16", "bfloat16", 3e-2),
        ("float16", "mixed_float16", "float16", 5e-3),
    )
    def test_mixed_precision(self, policy, compute_dtype, tolerance):
        case = "einsum_bias_activation"
        x = make_inputs(case)
        reference = self.make_layer(case)
        randomize_adapter(reference)
        expected = reference(x)

        keras.config.set_dtype_policy(policy)
        layer = self.make_layer(case)
        self.assertEqual(layer.dtype_policy.name, policy)
        self.assertEqual(layer.layer.dtype_policy.name, policy)
        layer.set_weights(reference.get_weights())
        for variable in (layer.magnitude, layer.lora_a, layer.lora_b):
            self.assertEqual(variable.dtype, "float32")
        outputs = layer(x)
        self.assertDTypeEqual(outputs, compute_dtype)
        self.assertDTypeEqual(layer.merged_kernel(), layer.layer.kernel.dtype)
        self.assertAllClose(
            ops.cast(outputs, "float32"),
            expected,
            atol=tolerance * 4,
            rtol=tolerance,
        )
        target = ops.ones(outputs.shape, "float32")
        grads = gradients(
            lambda: ops.sum(ops.cast(layer(x), "float32") * target),
            [layer.magnitude, layer.lora_a, layer.lora_b],
        )
        for grad in grads:
            self.assertEqual(grad.dtype, np.float32)
            self.assertTrue(np.all(np.isfinite(grad)))

    def test_direction_regularization_matches_numpy(self):
        layers = [self.make_layer("dense"), self.make_layer("gemma_query")]
        for seed, layer in enumerate(layers):
            randomize_adapter(layer, seed=seed)
        cases = ["dense", "gemma_query"]
        penalties = [
            numpy_penalty(numpy_variables(layer), case)
            for layer, case in zip(layers, cases)
        ]
        expected = np.mean(penalties)

        penalty = direction_regularization(layers)
        self.assertEqual(tuple(penalty.shape), ())
        self.assertDTypeEqual(penalty, "float32")
        self.assertAllClose(penalty, expected, atol=1e-5, rtol=1e-5)
        self.assertAllClose(
            direction_regularization(layers[1]), penalties[1], atol=1e-5
        )

        inputs = keras.Input(shape=(5,))
        model = keras.Model(inputs, layers[0](inputs))
        self.assertAllClose(
            direction_regularization(model), penalties[0], atol=1e-5
        )

    @parameterized.named_parameters(named_cases("dense", "gemma_query"))
    def test_direction_regularization_gradients_match_numpy(self, case):
        # The penalty is computed from low-rank pieces, never from V^T V:
        # its gradient is checked against finite differences of the plain
        # formula, in float64.
        layer = self.make_layer(case)
        randomize_adapter(layer)
        expected = numeric_gradients(
            lambda values: numpy_penalty(values, case),
            numpy_variables(layer),
            ["lora_a", "lora_b"],
        )
        grads = gradients(
            lambda: direction_regularization(layer),
            [layer.lora_a, layer.lora_b],
        )
        for grad, reference in zip(grads, expected):
            self.assertGreater(np.abs(reference).max(), 1e-3)
            self.assertAllClose(grad, reference, atol=1e-4, rtol=1e-3)

    def test_direction_regularization_follows_a_changed_base(self):
        # What the penalty computes from W0 alone may be kept between calls
        # (eager torch): after W0 changes it must be the new W0's penalty.
        layer = self.make_layer("gemma_query")
        randomize_adapter(layer)
        first = numpy_penalty(numpy_variables(layer), "gemma_query")
        for _ in range(2):
            self.assertAllClose(
                direction_regularization(layer), first, atol=1e-5
            )
        kernel = layer.layer.kernel
        kernel.assign(
            np.random.default_rng(7).normal(size=kernel.shape).astype("float32")
        )
        second = numpy_penalty(numpy_variables(layer), "gemma_query")
        self.assertGreater(abs(second - first), 1e-2)
        self.assertAllClose(direction_regularization(layer), second, atol=1e-5)

    def test_direction_regularization_of_many_layers(self):
        # Layers of one shape, rank and scale are computed together, stacked:
        # each must still get its own penalty and gradient, and follow its
        # own W0.
        layers = [random_layer("dense", seed) for seed in range(3)]
        layers += [
            random_layer("gemma_query", 3),
            random_layer("dense", 4, rank=3),
        ]
        cases = ["dense"] * 3 + ["gemma_query", "dense"]
        scales = [ALPHA / RANK] * 4 + [ALPHA / 3]

        def expected():
            return np.mean(
                [
                    numpy_penalty(numpy_variables(layer), case, scale)
                    for layer, case, scale in zip(layers, cases, scales)
                ]
            )

        self.assertAllClose(
            direction_regularization(layers), expected(), atol=1e-5
        )
        grads = gradients(
            lambda: direction_regularization(layers),
            [layers[1].lora_a, layers[1].lora_b],
        )
        references = numeric_gradients(
            lambda values: numpy_penalty(values, "dense"),
            numpy_variables(layers[1]),
            ["lora_a", "lora_b"],
        )
        for grad, reference in zip(grads, references):
            self.assertAllClose(
                grad, reference / len(layers), atol=1e-4, rtol=1e-3
            )
        before = expected()
        kernel = layers[2].layer.kernel
        kernel.assign(
            np.random.default_rng(9).normal(size=kernel.shape).astype("float32")
        )
        self.assertGreater(abs(expected() - before), 1e-3)
        self.assertAllClose(
            direction_regularization(layers), expected(), atol=1e-5
        )

    def test_shared_column_scales_match_numpy(self):
        # Inside the block, layers of one group take their scales from one
        # stacked computation: each must still compute its own DoRA output
        # and gradient. The layers form four groups (three alike, another
        # shape, another rank, a detached norm) and a LoRA layer.
        layers = [random_layer("dense", seed) for seed in range(3)]
        layers += [
            random_layer("gemma_query", 3),
            random_layer("dense", 4, rank=3),
            random_layer("dense", 5, detach_norm=True),
            random_layer("dense", 6, magnitude=False),
        ]
        cases = ["dense"] * 3 + ["gemma_query"] + ["dense"] * 3
        ranks = [RANK] * 4 + [3] + [RANK] * 2
        inputs = [make_inputs(case, seed=i) for i, case in enumerate(cases)]

        def expected_output(index, values, norm=None):
            kernel = numpy_merged_kernel(
                values["kernel"],
                values["lora_a"],
                values["lora_b"],
                values["magnitude"],
                cases[index],
                norm=norm,
                scale=ALPHA / ranks[index],
            )
            return numpy_forward(
                inputs[index], kernel, values["bias"], cases[index]
            )

        with shared_column_scales(layers):
            outputs = [layer(x) for layer, x in zip(layers, inputs)]
        for index, output in enumerate(outputs):
            self.assertAllClose(
                output,
                expected_output(index, numpy_variables(layers[index])),
                atol=1e-5,
                rtol=1e-5,
            )

        targets = [
            np.random.default_rng(i).normal(size=output.shape)
            for i, output in enumerate(outputs)
        ]

        def loss():
            with shared_column_scales(layers):
                return sum(
                    ops.sum(layer(x) * ops.convert_to_tensor(t, "float32"))
                    for layer, x, t in zip(layers, inputs, targets)
                )

        for index in (1, 3, 4, 5):
            checked = layers[index]
            values = numpy_variables(checked)
            norm = None
            if checked.detach_norm:
                norm = pairwise_norm(values, "dense")
            grads = gradients(
                loss, [checked.magnitude, checked.lora_a, checked.lora_b]
            )
            references = numeric_gradients(
                lambda v: np.sum(
                    expected_output(index, v, norm) * targets[index]
                ),
                values,
                ["magnitude", "lora_a", "lora_b"],
            )
            for grad, reference in zip(grads, references):
                self.assertGreater(np.abs(reference).max(), 1e-3)
                self.assertAllClose(grad, reference, atol=1e-3, rtol=1e-3)

    def test_shared_column_scales_compute_each_group_once(self):
        # The point of the block: one norm computation per group for the
        # outputs and the penalty together, where layer by layer each
        # output computes its own.
        layers = [self.make_layer("dense") for _ in range(3)]
        for seed, layer in enumerate(layers):
            randomize_adapter(layer, seed=seed)
        x = make_inputs("dense")
        expected_penalty = np.mean(
            [numpy_penalty(numpy_variables(layer), "dense") for layer in layers]
        )
        calls = []
        original = bidora_dense._norm_parts

        def counting(*args):
            calls.append(tuple(args[2].shape))
            return original(*args)

        with mock.patch.object(bidora_dense, "_norm_parts", counting):
            for layer in layers:
                layer(x)
            self.assertLen(calls, 3)
            calls.clear()
            with shared_column_scales(layers):
                for layer in layers:
                    layer(x)
                penalty = direction_regularization(layers)
            self.assertEqual(calls, [(3, 5, RANK)])
        self.assertAllClose(penalty, expected_penalty, atol=1e-5)

    def test_shared_column_scales_end_with_the_block(self):
        # After the block (left normally or by an error) the layers follow
        # their adapters again; a layer outside the block's list computes
        # its own scale inside it.
        inside, outside = self.make_layer("dense"), self.make_layer("dense")
        randomize_adapter(inside)
        randomize_adapter(outside, seed=4)
        x = make_inputs("dense")
        with self.assertRaisesRegex(RuntimeError, "inside the block"):
            with shared_column_scales([inside]):
                inside(x)
                self.assertAllClose(
                    outside(x),
                    numpy_output(x, numpy_variables(outside), "dense"),
                    atol=1e-5,
                )
                raise RuntimeError("inside the block")
        randomize_adapter(inside, seed=7)
        self.assertAllClose(
            inside(x),
            numpy_output(x, numpy_variables(inside), "dense"),
            atol=1e-5,
        )

    def test_direction_regularization_zero_for_orthogonal_kernel(self):
        base = keras.layers.Dense(4)
        base.build((None, 4))
        rng = np.random.default_rng(0)
        orthogonal, _ = np.linalg.qr(rng.normal(size=(4, 4)))
        # Columns of different lengths stay orthogonal.
        base.kernel.assign(
            (orthogonal * [0.5, 1.0, 2.0, 3.0]).astype("float32")
        )
        layer = BiDoRADense(base, rank=RANK)
        self.assertAllClose(direction_regularization(layer), 0.0, atol=1e-5)
        randomize_adapter(layer)
        self.assertGreater(to_numpy(direction_regularization(layer)), 1e-2)

    def test_direction_regularization_without_adapters(self):
        with pytest.raises(ValueError, match="model_or_layers"):
            direction_regularization([keras.layers.Dense(2)])

    @parameterized.named_parameters(
        ("rank_zero", dict(rank=0), "rank=0"),
        ("rank_float", dict(rank=1.5), "rank=1.5"),
        ("rank_bool", dict(rank=True), "rank=True"),
        ("alpha_negative", dict(alpha=-1.0), "alpha=-1.0"),
        ("alpha_zero", dict(alpha=0), "alpha=0"),
        ("dropout_one", dict(dropout=1.0), "dropout=1.0"),
        ("dropout_negative", dict(dropout=-0.1), "dropout=-0.1"),
    )
    def test_invalid_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            BiDoRADense(make_base("dense"), **kwargs)

    def test_invalid_layers(self):
        conv = keras.layers.Conv1D(2, 3)
        conv.build((None, 8, 4))
        with pytest.raises(ValueError, match="layer=.*Conv1D"):
            BiDoRADense(conv)

        with pytest.raises(ValueError, match="layer=.*not built"):
            BiDoRADense(keras.layers.Dense(3))

        # EinsumDense builds this one, but nothing is contracted with the
        # kernel, so there is no column norm.
        broadcast = keras.layers.EinsumDense("ab,c->abc", (None, 4))
        broadcast.build((None, 3))
        with pytest.raises(ValueError, match="equation=ab,c->abc"):
            BiDoRADense(broadcast)

        lora = make_base("dense")
        lora.enable_lora(2)
        with pytest.raises(ValueError, match="LoRA.*layer="):
            BiDoRADense(lora)

    @parameterized.named_parameters(named_cases("dense", "bert_qkv"))
    def test_dropout(self, case):
        x = make_inputs(case)
        layer = self.make_layer(case, dropout=0.5)
        randomize_adapter(layer)
        plain = BiDoRADense(layer.layer, rank=RANK, alpha=ALPHA)
        plain.build()
        plain.set_weights(layer.get_weights())

        inference = layer(x, training=False)
        self.assertAllClose(inference, plain(x), atol=1e-6)
        self.assertAllClose(layer(x), inference, atol=1e-6)
        self.assertNotAllClose(layer(x, training=True), inference, atol=1e-3)
