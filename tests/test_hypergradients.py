"""Tests for `keras_bidora.training.hypergradients` against independent
references.

The references are computed here with each backend's own autodiff (JAX
`jax.grad`, TensorFlow nested `GradientTape`s, `torch.autograd.grad` with
`create_graph=True`) and, for the Neumann series, with explicit Hessians and
NumPy linear algebra. The model is tiny. It runs in float64 on TensorFlow;
on JAX and torch Keras computes `matmul` of float64 inputs in float32 (its
type promotion maps 64-bit results to 32 bits, as JAX does without x64), so
there it runs in float32 with tolerances to match.
"""

import keras
import numpy as np
from keras import ops

from keras_bidora import BiDoRADense
from keras_bidora.training import backend as backend_lib
from keras_bidora.training import hypergradients
from tests.test_case import TestCase
from tests.test_case import to_numpy

FLOAT64 = keras.config.backend() == "tensorflow"
DTYPE = "float64" if FLOAT64 else "float32"
# Tolerance of quantities computed two ways that agree up to round-off.
RTOL = 1e-10 if FLOAT64 else 1e-5


def jit(fn):
    """`jax.jit` on JAX, where eager nested gradients are slow."""
    if keras.config.backend() == "jax":
        import jax

        return jax.jit(fn)
    return fn


# Per-backend autodiff, written independently of
# `keras_bidora.training.backend`.


def grad(fn, params):
    """Gradient of the scalar `fn(params)` in the list `params`.

    The result stays differentiable, so `grad` nests (as `jax.grad` does).
    """
    params = list(params)
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return list(jax.grad(fn)(params))
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(params)
            value = fn(params)
        grads = tape.gradient(value, params)
    else:
        import torch

        params = [
            p if p.requires_grad else p.detach().requires_grad_(True)
            for p in params
        ]
        with torch.enable_grad():
            value = fn(params)
            grads = torch.autograd.grad(
                value, params, create_graph=True, allow_unused=True
            )
    return [
        ops.zeros_like(p) if g is None else g for p, g in zip(params, grads)
    ]


def flat(values):
    return np.concatenate([np.ravel(to_numpy(v)) for v in values])


def unflat(vector, like):
    values, start = [], 0
    for x in like:
        size = int(np.prod(x.shape))
        values.append(
            ops.convert_to_tensor(
                np.reshape(vector[start : start + size], tuple(x.shape)),
                dtype=DTYPE,
            )
        )
        start += size
    return values


class Problem:
    """Two stateless MSE losses of a tiny adapted network.

    `Input(4) -> BiDoRADense(Dense(5)) -> tanh -> BiDoRADense(Dense(3)) ->
    Dense(2)`. `w_vars` are the lower variables, `m_vars` the magnitudes.
    """

    def __init__(self, seed=0, head_only=False, ridge=0.0):
        self.ridge = ridge
        rng = np.random.default_rng(seed)
        first = _adapter(5, 4, rng, "first")
        second = _adapter(3, 5, rng, "second")
        head = keras.layers.Dense(2, dtype=DTYPE, name="head")
        head.build((None, 3))
        head.kernel.assign(rng.normal(size=(3, 2)))
        head.bias.assign(rng.normal(size=(2,)) * 0.1)
        self.layers = (first, second, head)
        self.m_vars = [first.magnitude, second.magnitude]
        self.w_vars = [head.kernel, head.bias]
        if not head_only:
            self.w_vars = [
                first.lora_a,
                first.lora_b,
                second.lora_a,
                second.lora_b,
            ] + self.w_vars
        self.lower_batch = _batch(rng, 12)
        self.upper_batch = _batch(rng, 8)
        # Passes each estimator runs, counted as calls of the two losses.
        self.lower_calls = 0
        self.upper_calls = 0
        self._build_references()

    @property
    def w(self):
        return [ops.convert_to_tensor(v.value) for v in self.w_vars]

    @property
    def m(self):
        return [ops.convert_to_tensor(v.value) for v in self.m_vars]

    def _loss(self, w, m, batch):
        x, y = batch
        first, second, head = self.layers
        mapping = list(zip(self.w_vars, w)) + list(zip(self.m_vars, m))
        with keras.StatelessScope(state_mapping=mapping):
            y_pred = head(second(ops.tanh(first(x))))
        return ops.mean(ops.square(y_pred - y))

    def _lower(self, w, m, batch):
        penalty = sum(ops.sum(ops.square(x)) for x in w)
        return self._loss(w, m, batch) + self.ridge * penalty

    # The interface `keras_bidora.training.hypergradients` expects.
    def lower_loss(self, w, m, batch):
        self.lower_calls += 1
        return self._lower(w, m, batch), ()

    def upper_loss(self, w, m, batch):
        self.upper_calls += 1
        return self._loss(w, m, batch), ()

    # References, as NumPy arrays.
    def lower_grads(self, w, m):
        # Constants, as the train step passes them: on torch a gradient that
        # kept its graph would let later gradients in `m` flow through it.
        return [_constant(g) for g in self._lower_grads(w, m)]

    def lower_grad_m(self, w, m):
        """`grad_m L_low(w, m)`, which the lower step computes with `g`."""
        return [_constant(g) for g in self._lower_grad_m(w, m)]

    def upper_grad_w(self, w, m):
        return self._upper_grad_w(w, m)

    def upper_grad_m(self, w, m):
        return self._upper_grad_m(w, m)

    def unrolled_hypergradient(self, w, m, xi):
        """d/dm L_up(w - xi * grad_w L_low(w, m), m), through the unroll."""
        return self._unrolled(w, m, _constant(xi))

    def hessians(self, w, m):
        """Explicit `H_ww` (n_w, n_w) and `H_mw` (n_m, n_w) of L_low."""
        n_w = len(w)
        size = flat(w).size
        h_ww, h_mw = [], []
        for i in range(size):
            column = self._hessian_column(w, m, unflat(np.eye(size)[i], w))
            h_ww.append(flat(column[:n_w]))
            h_mw.append(flat(column[n_w:]))
        return np.stack(h_ww, axis=1), np.stack(h_mw, axis=1)

    def _build_references(self):
        batch_low, batch_up = self.lower_batch, self.upper_batch

        def lower_grads(w, m):
            return grad(lambda w_: self._lower(w_, m, batch_low), w)

        def lower_grad_m(w, m):
            return grad(lambda m_: self._lower(w, m_, batch_low), m)

        def upper_grad_w(w, m):
            return grad(lambda w_: self._loss(w_, m, batch_up), w)

        def upper_grad_m(w, m):
            return grad(lambda m_: self._loss(w, m_, batch_up), m)

        def unrolled(w, m, xi):
            def loss(m_values):
                g = grad(lambda w_: self._lower(w_, m_values, batch_low), w)
                virtual = [wi - xi * gi for wi, gi in zip(w, g)]
                return self._loss(virtual, m_values, batch_up)

            return grad(loss, m)

        def hessian_column(w, m, basis):
            n_w = len(w)

            def directional(params):
                g = grad(
                    lambda w_: self._lower(w_, params[n_w:], batch_low),
                    params[:n_w],
                )
                return sum(ops.sum(a * b) for a, b in zip(g, basis))

            return grad(directional, list(w) + list(m))

        self._lower_grads = _numpy(jit(lower_grads))
        self._lower_grad_m = _numpy(jit(lower_grad_m))
        self._upper_grad_w = _numpy(jit(upper_grad_w))
        self._upper_grad_m = _numpy(jit(upper_grad_m))
        self._unrolled = _numpy(jit(unrolled))
        self._hessian_column = _numpy(jit(hessian_column))


def _numpy(fn):
    def wrapped(*args):
        return [to_numpy(x) for x in fn(*args)]

    return wrapped


def _constant(x):
    return ops.convert_to_tensor(to_numpy(x), dtype=DTYPE)


def _adapter(units, in_dim, rng, name):
    dense = keras.layers.Dense(units, dtype=DTYPE, name=name)
    dense.build((None, in_dim))
    dense.kernel.assign(rng.normal(size=(in_dim, units)) / np.sqrt(in_dim))
    dense.bias.assign(rng.normal(size=(units,)) * 0.1)
    adapter = BiDoRADense(
        dense, rank=2, alpha=2, detach_norm=False, name=f"{name}_ad"
    )
    adapter.build((None, in_dim))
    # Move B off zero (so every direction gradient is non-zero) and m off
    # the column norms (so the normalisation matters).
    adapter.lora_a.assign(rng.normal(size=adapter.lora_a.shape) * 0.5)
    adapter.lora_b.assign(rng.normal(size=adapter.lora_b.shape) * 0.5)
    adapter.magnitude.assign(rng.uniform(0.5, 1.5, size=(units,)))
    return adapter


def _batch(rng, size):
    x = rng.normal(size=(size, 4))
    y = rng.normal(size=(size, 2))
    return (
        ops.convert_to_tensor(x, dtype=DTYPE),
        ops.convert_to_tensor(y, dtype=DTYPE),
    )


def _relative_error(estimate, reference):
    estimate, reference = flat(estimate), flat(reference)
    return np.linalg.norm(estimate - reference) / np.linalg.norm(reference)


class HypergradientsTest(TestCase):
    def setUp(self):
        super().setUp()
        self.backend = backend_lib.get()

    def estimate(self, name, problem, learning_rate, terms=3):
        """Runs the estimator `name` at the problem's current `w`, `m`."""
        estimator = hypergradients.get(name)

        def run(w, m, lower_grads, lower_magnitude_grads, learning_rate):
            # Every estimator gets what the train step passes; only
            # darts_forward reads `lower_magnitude_grads`.
            return estimator(
                self.backend,
                problem,
                w,
                m,
                lower_grads,
                problem.lower_batch,
                problem.upper_batch,
                learning_rate,
                terms=terms,
                lower_magnitude_grads=lower_magnitude_grads,
            )

        w, m = problem.w, problem.m
        loss, hypergradient = run(
            w,
            m,
            problem.lower_grads(w, m),
            problem.lower_grad_m(w, m),
            _constant(learning_rate),
        )
        return to_numpy(loss), [to_numpy(h) for h in hypergradient]

    def upper_loss(self, problem, w, m):
        return to_numpy(problem._loss(w, m, problem.upper_batch))

    def test_first_order_is_gradient_of_upper_loss(self):
        problem = Problem()
        loss, hypergradient = self.estimate("first_order", problem, 0.5)
        w, m = problem.w, problem.m
        expected = problem.upper_grad_m(w, m)
        self.assertGreater(np.linalg.norm(flat(expected)), 1e-2)
        self.assertAllClose(hypergradient, expected, atol=RTOL, rtol=RTOL)
        self.assertAllClose(
            loss, self.upper_loss(problem, w, m), atol=0, rtol=RTOL
        )
        self.assertEqual(problem.upper_calls, 1)
        for value in hypergradient:
            self.assertDTypeEqual(value, DTYPE)

    def test_darts_matches_one_step_unroll(self):
        problem = Problem()
        xi = 0.5
        loss, estimate = self.estimate("darts", problem, xi)
        w, m = problem.w, problem.m
        g = problem.lower_grads(w, m)
        exact = problem.unrolled_hypergradient(w, m, xi)
        # What a wrong sign or a wrong factor on xi would give, and the
        # first-order gradient at the virtual step (no second-order term).
        wrong_sign = problem.unrolled_hypergradient(w, m, -xi)
        wrong_factor = problem.unrolled_hypergradient(w, m, 2 * xi)
        virtual = [wi - xi * gi for wi, gi in zip(w, g)]
        first_order_at_virtual = problem.upper_grad_m(virtual, m)

        # The central difference with eps = 0.01 / ||v|| is O(1e-4) accurate.
        error = np.linalg.norm(flat(estimate) - flat(exact))
        self.assertLess(error, 1e-3 * np.linalg.norm(flat(exact)))
        for wrong in (wrong_sign, wrong_factor, first_order_at_virtual):
            self.assertLess(
                100 * error, np.linalg.norm(flat(estimate) - flat(wrong))
            )
        # The upper loss reported is the one at the virtual step.
        self.assertAllClose(
            loss, self.upper_loss(problem, virtual, m), atol=0, rtol=RTOL
        )

    def test_darts_forward_matches_one_step_unroll(self):
        problem = Problem()
        xi = 0.5
        loss, estimate = self.estimate("darts_forward", problem, xi)
        w, m = problem.w, problem.m
        g = problem.lower_grads(w, m)
        exact = problem.unrolled_hypergradient(w, m, xi)
        virtual = [wi - xi * gi for wi, gi in zip(w, g)]
        first_order_at_virtual = problem.upper_grad_m(virtual, m)
        first_order = problem.upper_grad_m(w, m)
        second_order = flat(exact) - flat(first_order_at_virtual)

        # The one-sided difference with eps = 0.01 / ||v|| errs by
        # (eps / 2) * d3L_low/dm dw dw [v, v] + O(eps^2): with eps * ||v||
        # = 0.01, about 0.5% of the second-order term times the ratio of
        # the third to the second derivative (O(1) in this tanh network;
        # 0.75% measured, on every backend). Allow 3%. The round-off of the
        # float32 difference of two gradients divided by eps is ~1e-5.
        error = np.linalg.norm(flat(estimate) - flat(exact))
        self.assertLess(error, 3e-2 * np.linalg.norm(second_order))
        self.assertLess(error, 3e-2 * np.linalg.norm(flat(exact)))
        # Far closer to the unroll than the first-order estimates; less
        # accurate than the central difference of darts (O(eps^2)).
        for wrong in (first_order, first_order_at_virtual):
            self.assertLess(
                10 * error, np.linalg.norm(flat(estimate) - flat(wrong))
            )
        _, central = self.estimate("darts", problem, xi)
        self.assertLess(np.linalg.norm(flat(central) - flat(exact)), error)
        # The upper loss reported is the one at the virtual step.
        self.assertAllClose(
            loss, self.upper_loss(problem, virtual, m), atol=0, rtol=RTOL
        )

    def test_passes_per_upper_step(self):
        # darts_forward reuses grad_m L_low(w, m) from the lower step: one
        # upper pass and one lower pass, against darts' one and two.
        for name, upper, lower in (
            ("first_order", 1, 0),
            ("darts", 1, 2),
            ("darts_forward", 1, 1),
        ):
            problem = Problem()
            self.estimate(name, problem, 0.5)
            self.assertEqual(problem.upper_calls, upper, msg=name)
            self.assertEqual(problem.lower_calls, lower, msg=name)

    def test_darts_forward_needs_lower_magnitude_grads(self):
        problem = Problem()
        w, m = problem.w, problem.m
        with self.assertRaisesRegex(ValueError, "lower_magnitude_grads"):
            hypergradients.darts_forward(
                self.backend,
                problem,
                w,
                m,
                problem.lower_grads(w, m),
                problem.lower_batch,
                problem.upper_batch,
                _constant(0.5),
            )

    def test_darts_forward_with_zero_learning_rate_is_first_order(self):
        problem = Problem(seed=1)
        _, estimate = self.estimate("darts_forward", problem, 0.0)
        expected = problem.upper_grad_m(problem.w, problem.m)
        self.assertAllClose(estimate, expected, atol=RTOL, rtol=RTOL)

    def test_darts_with_zero_learning_rate_is_first_order(self):
        problem = Problem(seed=1)
        _, estimate = self.estimate("darts", problem, 0.0)
        expected = problem.upper_grad_m(problem.w, problem.m)
        self.assertAllClose(estimate, expected, atol=RTOL, rtol=RTOL)

    def test_neumann_is_the_truncated_series(self):
        # Non-convex lower problem: the series need not converge, but each
        # truncation is a fixed formula, computed here with explicit
        # Hessians:  dL_up/dm - xi H_mw sum_{j<=K} (I - xi H_ww)^j v.
        problem = Problem(seed=2)
        w, m = problem.w, problem.m
        h_ww, h_mw = problem.hessians(w, m)
        self.assertAllClose(h_ww, h_ww.T, atol=100 * RTOL, rtol=0)
        v = flat(problem.upper_grad_w(w, m))
        direct = flat(problem.upper_grad_m(w, m))
        xi = 0.3
        for terms in (0, 1, 3):
            p, total = v, np.zeros_like(v)
            for _ in range(terms + 1):
                total = total + p
                p = p - xi * h_ww @ p
            expected = direct - xi * h_mw @ total
            loss, estimate = self.estimate("neumann", problem, xi, terms)
            self.assertAllClose(
                flat(estimate), expected, atol=10 * RTOL, rtol=10 * RTOL
            )
            self.assertAllClose(
                loss, self.upper_loss(problem, w, m), atol=0, rtol=RTOL
            )
        # The second-order term matters here.
        self.assertGreater(
            np.linalg.norm(expected - direct), 0.1 * np.linalg.norm(direct)
        )

    def test_neumann_converges_to_implicit_gradient(self):
        # With only the head as lower variables, MSE is convex in them (H
        # positive definite), so dL_up/dm - H_mw H_ww^-1 v exists and the
        # series converges to it for xi < 2 / lambda_max. A ridge term keeps
        # H well conditioned, so that 32 terms get close.
        problem = Problem(seed=3, head_only=True, ridge=0.1)
        w, m = problem.w, problem.m
        h_ww, h_mw = problem.hessians(w, m)
        eigenvalues = np.linalg.eigvalsh(h_ww)
        self.assertGreater(eigenvalues.min(), 0)
        v = flat(problem.upper_grad_w(w, m))
        direct = flat(problem.upper_grad_m(w, m))
        implicit = direct - h_mw @ np.linalg.solve(h_ww, v)
        self.assertGreater(
            np.linalg.norm(implicit - direct), 0.1 * np.linalg.norm(implicit)
        )

        xi = 1.0 / eigenvalues.max()
        errors = []
        for terms in (0, 2, 8, 32):
            _, estimate = self.estimate("neumann", problem, xi, terms)
            errors.append(
                np.linalg.norm(flat(estimate) - implicit)
                / np.linalg.norm(implicit)
            )
        for before, after in zip(errors, errors[1:]):
            self.assertLess(after, before)
        self.assertLess(errors[-1], 0.01 * errors[0])
        self.assertLess(errors[-1], 0.01)

    def test_get(self):
        self.assertIs(hypergradients.get("darts"), hypergradients.darts)
        self.assertIs(
            hypergradients.get("darts_forward"), hypergradients.darts_forward
        )
        self.assertIs(hypergradients.get("neumann"), hypergradients.neumann)
        with self.assertRaisesRegex(ValueError, "hypergradient must be one"):
            hypergradients.get("second_order")
