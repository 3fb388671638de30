"""Tests for `BiDoRAModel`: what each level trains, data, saving, errors.

Most models here are built by hand (`BiDoRADense` layers in a functional
model with a trainable `Dense` head), so that `BiDoRAModel` does not inject
anything; the saving tests use `keras_bidora.inject`, which `.keras` files
rebuild from. Every initial weight is set from a seeded NumPy generator, so
the same model can be built twice, in one process or on another backend.

`python -m tests.test_bidora_model` prints the per-step losses of a fixed
20-step run as JSON; the cross-backend test compares them.
"""

import json
import math
import os
import subprocess
import sys
from unittest import mock

import keras
import numpy as np
import pytest

from keras_bidora import BiDoRADense
from keras_bidora import BiDoRAModel
from keras_bidora.layers import bidora_dense
from keras_bidora.training import hypergradients
from keras_bidora.training import step as step_lib
from tests.test_case import TestCase
from tests.test_case import to_numpy
from tests.test_hypergradients import grad
from tests.test_hypergradients import jit

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Models and data ---------------------------------------------------------


def adapter(units, in_dim, name, magnitude=True):
    dense = keras.layers.Dense(units, name=name)
    dense.build((None, in_dim))
    layer = BiDoRADense(
        dense,
        rank=2,
        alpha=2,
        detach_norm=False,
        magnitude=magnitude,
        name=f"{name}_adapter",
    )
    layer.build((None, in_dim))
    return layer


def set_weights(model, seed):
    """Sets every weight from `seed`, in path order (backend-independent)."""
    rng = np.random.default_rng(seed)
    for variable in sorted(model.weights, key=lambda v: v.path):
        if variable.path.endswith("magnitude"):
            value = rng.uniform(0.5, 1.5, size=variable.shape)
        else:
            # lora_b too: off zero, so that lora_a gets gradients at once.
            value = rng.normal(size=variable.shape) * 0.5
        variable.assign(value.astype(variable.dtype))


def build_base(seed=0, dict_inputs=False, magnitude=True):
    """`x -> BiDoRADense -> tanh -> BiDoRADense -> Dense head`."""
    if dict_inputs:
        inputs = {
            "a": keras.Input((3,), name="a"),
            "b": keras.Input((1,), name="b"),
        }
        features = keras.layers.Concatenate()([inputs["a"], inputs["b"]])
    else:
        inputs = features = keras.Input((4,), name="x")
    hidden = adapter(5, 4, "first", magnitude)(features)
    hidden = keras.layers.Activation("tanh")(hidden)
    hidden = adapter(3, 5, "second", magnitude)(hidden)
    outputs = keras.layers.Dense(2, name="head")(hidden)
    model = keras.Model(inputs, outputs)
    set_weights(model, seed)
    return model


def build_plain_base(seed=0):
    """The same network without adapters, for `keras_bidora.inject`."""
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(5, activation="tanh", name="first")(inputs)
    hidden = keras.layers.Dense(3, name="second")(hidden)
    outputs = keras.layers.Dense(2, name="head")(hidden)
    model = keras.Model(inputs, outputs)
    set_weights(model, seed)
    return model


def make_data(size, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, 4)).astype("float32")
    y = np.stack([np.sin(x[:, 0]) + 0.5 * x[:, 1], x[:, 2] * x[:, 3]], -1)
    return x, y.astype("float32")


def snapshot(model):
    return {v.path: to_numpy(v).copy() for v in model.model.weights}


def select(weights, *suffixes):
    return {
        path: value
        for path, value in weights.items()
        if path.endswith(suffixes)
    }


MAGNITUDE = ("magnitude",)
DIRECTION = ("lora_a", "lora_b")
HEAD = ("head/kernel", "head/bias")
FROZEN = ("first/kernel", "first/bias", "second/kernel", "second/bias")


class ArrayPyDataset(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index):
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[part], self.y[part]


class BatchLogger(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append({k: float(to_numpy(v)) for k, v in logs.items()})


# The cross-backend reference run ------------------------------------------


def reference_losses():
    """Per-step logs of a fixed 20-step bi-level run, on this backend."""
    x, y = make_data(40)
    runs = {}
    for hypergradient, upper_every in (("darts", 2), ("neumann", 1)):
        keras.utils.clear_session()
        model = BiDoRAModel(
            build_base(seed=3),
            hypergradient=hypergradient,
            upper_every=upper_every,
            neumann_terms=2,
            seed=5,
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.5),
            upper_optimizer=keras.optimizers.Adam(0.02),
            loss="mse",
        )
        logger = BatchLogger()
        # 40 samples: 32 lower (4 steps of 8 per epoch), 8 upper.
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=5,
            shuffle=False,
            callbacks=[logger],
            verbose=0,
        )
        runs[hypergradient] = {
            key: [logs[key] for logs in logger.logs]
            for key in ("loss", "upper_loss")
        }
    return runs


# Tests -----------------------------------------------------------------


class BiDoRAModelTest(TestCase):
    def compiled(
        self,
        base=None,
        optimizer=None,
        upper_optimizer=None,
        compile_kwargs=None,
        **kwargs,
    ):
        base = build_base() if base is None else base
        # first_order compiles fastest; tests of the estimators ask for more.
        kwargs.setdefault("hypergradient", "first_order")
        model = BiDoRAModel(base, **kwargs)
        model.compile(
            optimizer=optimizer or keras.optimizers.SGD(0.1),
            upper_optimizer=upper_optimizer or keras.optimizers.SGD(0.1),
            loss="mse",
            **(compile_kwargs or {}),
        )
        return model

    def assertChanged(self, before, after, suffixes):
        selected = select(before, *suffixes)
        self.assertNotEmpty(selected)
        for path, value in selected.items():
            self.assertNotAllClose(
                value, after[path], atol=1e-7, rtol=0, msg=f"{path} fixed"
            )

    def assertUnchanged(self, before, after, suffixes):
        selected = select(before, *suffixes)
        self.assertNotEmpty(selected)
        for path, value in selected.items():
            self.assertAllClose(
                value, after[path], atol=0, rtol=0, msg=f"{path} moved"
            )

    # Which level moves what -----------------------------------------------

    def test_steps_without_upper_update_never_change_magnitudes(self):
        # An epoch's first step always carries an upper update; with
        # upper_every larger than the epoch, no other step does. Four steps
        # must leave m where one step left it, while the rest moves on.
        x, y = make_data(16)
        upper = make_data(8, seed=2)
        results = []
        for size in (16, 4):
            model = self.compiled(
                upper_every=100,
                optimizer=keras.optimizers.Adam(0.05),
                upper_optimizer=keras.optimizers.Adam(0.05),
            )
            initial = snapshot(model)
            model.fit(
                x[:size],
                y[:size],
                batch_size=4,
                upper_data=upper,
                shuffle=False,
                verbose=0,
            )
            results.append(snapshot(model))
            self.assertChanged(initial, results[-1], MAGNITUDE)
        four_steps, one_step = results
        for path, value in select(one_step, *MAGNITUDE).items():
            self.assertAllClose(four_steps[path], value, atol=1e-7, rtol=0)
        self.assertChanged(one_step, four_steps, DIRECTION + HEAD)
        self.assertUnchanged(one_step, four_steps, FROZEN)

    def test_zero_lower_learning_rate_moves_only_magnitudes(self):
        x, y = make_data(20)
        model = self.compiled(
            optimizer=keras.optimizers.SGD(0.0),
            upper_optimizer=keras.optimizers.SGD(0.1),
        )
        before = snapshot(model)
        model.fit(x, y, batch_size=4, epochs=2, verbose=0)
        after = snapshot(model)
        self.assertChanged(before, after, MAGNITUDE)
        self.assertUnchanged(before, after, DIRECTION + HEAD + FROZEN)

    def test_darts_forward_moves_magnitudes_only_by_upper_optimizer(self):
        # darts_forward's lower pass differentiates in the magnitudes too;
        # the lower optimizer must still never apply that gradient.
        x, y = make_data(20)
        for lower_rate, upper_rate in ((0.1, 0.0), (0.0, 0.1)):
            model = self.compiled(
                hypergradient="darts_forward",
                optimizer=keras.optimizers.SGD(lower_rate),
                upper_optimizer=keras.optimizers.SGD(upper_rate),
            )
            before = snapshot(model)
            model.fit(x, y, batch_size=4, epochs=2, verbose=0)
            after = snapshot(model)
            moved, fixed = MAGNITUDE, DIRECTION + HEAD
            if upper_rate == 0:
                moved, fixed = fixed, moved
            self.assertChanged(before, after, moved)
            self.assertUnchanged(before, after, fixed + FROZEN)

    def test_model_passes_per_upper_step(self):
        # Forward+backward passes of one train step with an upper update,
        # counted as calls of the step's stateless loss (run eagerly: on JAX,
        # `lax.cond` traces the upper branch once per step): the lower pass,
        # plus 1 (first_order), 3 (darts) or 2 (darts_forward, which takes
        # grad_m L_low(w, m) from the lower pass).
        x, y = make_data(10)
        for name, passes in (
            ("first_order", 2),
            ("darts", 4),
            ("darts_forward", 3),
        ):
            model = self.compiled(
                hypergradient=name, compile_kwargs={"run_eagerly": True}
            )
            calls = []
            original = step_lib._Step.loss

            def counting(*args, original=original, calls=calls, **kwargs):
                calls.append(1)
                return original(*args, **kwargs)

            with mock.patch.object(step_lib._Step, "loss", counting):
                # 8 lower samples, 2 upper: one step, an upper one.
                model.fit(x, y, batch_size=8, verbose=0)
            self.assertLen(calls, passes, msg=name)

    def test_one_trace_per_phase(self):
        # The step functions run as Python once per trace of a compiled
        # train step (JAX, TensorFlow), and once per step when eager
        # (torch). 45 samples: 36 lower (9 batches of 4 per epoch) and 9
        # upper, which do not divide by 4: every upper batch is still full.
        x, y = make_data(45)
        model = self.compiled(upper_every=2)
        calls = {"bilevel": 0, "retrain": 0, "evaluate": 0}

        def counting(phase, function):
            def step(*args, **kwargs):
                calls[phase] += 1
                return function(*args, **kwargs)

            return step

        test_step = model.test_step
        steps = {
            phase: counting(phase, step_lib.STEPS[phase])
            for phase in ("bilevel", "retrain")
        }
        with (
            mock.patch.dict(step_lib.STEPS, steps),
            mock.patch.object(
                model, "test_step", counting("evaluate", test_step)
            ),
        ):
            model.fit(
                x,
                y,
                batch_size=4,
                epochs=2,
                validation_data=(x[:40], y[:40]),
                verbose=0,
            )
            model.retrain(x[:40], y[:40], batch_size=4, epochs=2, verbose=0)
        if keras.config.backend() == "torch":
            # Eager: each step runs once, none twice.
            self.assertEqual(
                calls, {"bilevel": 18, "retrain": 20, "evaluate": 20}
            )
        else:
            self.assertEqual(calls, {"bilevel": 1, "retrain": 1, "evaluate": 1})

    def test_one_trace_per_phase_from_datasets(self):
        # Batched `tf.data` splits: 36 lower samples (9 batches of 4) and an
        # upper dataset of 9 (batches of 4, 4, 1). The upper stream wraps
        # its short batch around, so every upper batch has 4 samples.
        import tensorflow as tf

        x, y = make_data(45)
        lower = tf.data.Dataset.from_tensor_slices((x[:36], y[:36])).batch(4)
        upper = tf.data.Dataset.from_tensor_slices((x[36:], y[36:])).batch(4)
        model = self.compiled(upper_every=2)
        calls = []
        step = step_lib.STEPS["bilevel"]
        seen = []

        def counting(model, state, data):
            calls.append(1)
            seen.append(data[1])
            return step(model, state, data)

        with mock.patch.dict(step_lib.STEPS, {"bilevel": counting}):
            model.fit(lower, upper_data=upper, epochs=2, verbose=0)
        if keras.config.backend() == "torch":
            self.assertLen(calls, 18)
            # An epoch's 5 upper batches cycle through the 9 samples.
            uppers = [to_numpy(batch[0]) for batch in seen[0:9:2]]
            expected = np.concatenate([x[36:]] * 3)[:20].reshape(5, 4, 4)
            self.assertAllClose(np.stack(uppers), expected)
        else:
            self.assertLen(calls, 1)

    def test_retrain_never_changes_magnitudes(self):
        x, y = make_data(20)
        model = self.compiled(upper_every=2)
        model.fit(x, y, batch_size=4, verbose=0)
        before = snapshot(model)
        history = model.retrain(x, y, epochs=2, batch_size=4, verbose=0)
        after = snapshot(model)
        self.assertUnchanged(before, after, MAGNITUDE + FROZEN)
        self.assertChanged(before, after, DIRECTION + HEAD)
        self.assertIn("loss", history.history)
        self.assertNotIn("upper_loss", history.history)
        # Back in the bi-level phase afterwards.
        history = model.fit(x, y, batch_size=4, verbose=0)
        self.assertIn("upper_loss", history.history)
        self.assertChanged(after, snapshot(model), MAGNITUDE)

    def test_upper_pass_runs_only_on_due_steps(self):
        executed = []
        original = hypergradients.darts

        def counting_darts(*args, **kwargs):
            result = original(*args, **kwargs)
            if keras.config.backend() == "jax":
                import jax

                # Runs when the compiled branch runs, not when it is traced.
                jax.debug.callback(lambda: executed.append(1))
            else:
                executed.append(1)
            return result

        x, y = make_data(40)
        model = self.compiled(
            hypergradient="darts",
            upper_every=3,
            # Eager TensorFlow runs one branch of `tf.cond`; torch is eager.
            compile_kwargs={
                "run_eagerly": keras.config.backend() == "tensorflow"
            },
        )
        with mock.patch.object(hypergradients, "darts", counting_darts):
            # 32 lower samples: 8 steps, upper updates at steps 1, 4, 7.
            model.fit(x, y, batch_size=4, epochs=2, verbose=0)
        self.assertLen(executed, 6)

    def test_train_step_follows_the_hypergradient_definitions(self):
        # The finite difference of darts is accurate to O(1e-4).
        self.check_train_step("darts", atol=2e-4, rtol=1e-3)

    def test_train_step_follows_the_darts_forward_definitions(self):
        # The one-sided difference is accurate to O(eps), about 1% of the
        # second-order term (see test_hypergradients): 1.6e-4 here, against
        # 5e-2 for first_order.
        self.check_train_step("darts_forward", atol=1e-3, rtol=1e-3)

    def test_train_on_batch_is_one_bilevel_step(self):
        # train_on_batch with upper_data: the same step as fit's, against
        # the same autodiff reference; its logs are the step's losses.
        self.check_train_step(
            "darts", atol=2e-4, rtol=1e-3, run="train_on_batch"
        )

    def check_train_step(self, hypergradient, atol, rtol, run="fit"):
        # One step, SGD at both levels: the lower variables move along the
        # lower gradient (task loss + penalty) and the magnitudes along the
        # exact one-step unrolled hypergradient, computed here by autodiff
        # through the unroll with xi = the lower learning rate. `run` is
        # "fit" or "train_on_batch".
        x, y = make_data(8)
        x_up, y_up = make_data(6, seed=2)
        lower_rate, upper_rate = 0.3, 0.5
        model = self.compiled(
            optimizer=keras.optimizers.SGD(lower_rate),
            upper_optimizer=keras.optimizers.SGD(upper_rate),
            hypergradient=hypergradient,
            direction_regularization=0.1,
        )
        before = snapshot(model)
        trainable = model.trainable_variables
        m_vars = [v for v in trainable if v.path.endswith("magnitude")]
        w_vars = [v for v in trainable if not v.path.endswith("magnitude")]
        self.assertLen(m_vars, 2)
        self.assertLen(w_vars, 6)

        def loss(w, m, x, y, penalty=0.0):
            mapping = list(zip(w_vars, w)) + list(zip(m_vars, m))
            with keras.StatelessScope(state_mapping=mapping):
                error = keras.ops.subtract(model(x), y)
                value = keras.ops.mean(keras.ops.square(error))
                if penalty:
                    from keras_bidora import direction_regularization

                    value = value + penalty * direction_regularization(
                        model.adapted_layers
                    )
            return value

        w = [keras.ops.convert_to_tensor(v.value) for v in w_vars]
        m = [keras.ops.convert_to_tensor(v.value) for v in m_vars]

        def references(w, m):
            def unrolled(m_values):
                g = grad(lambda w_: loss(w_, m_values, x, y, 0.1), w)
                virtual = [wi - lower_rate * gi for wi, gi in zip(w, g)]
                return loss(virtual, m_values, x_up, y_up)

            lower_grads = grad(lambda w_: loss(w_, m, x, y, 0.1), w)
            return lower_grads, grad(unrolled, m)

        lower_grads, hypergradient = jit(references)(w, m)
        expected_w = [
            to_numpy(wi) - lower_rate * to_numpy(gi)
            for wi, gi in zip(w, lower_grads)
        ]
        expected_m = [
            to_numpy(mi) - upper_rate * to_numpy(hi)
            for mi, hi in zip(m, hypergradient)
        ]
        # Copies: on torch, `m` holds the variables' own tensors.
        m_start = [to_numpy(mi).copy() for mi in m]

        if run == "fit":
            model.fit(
                x,
                y,
                batch_size=8,
                upper_data=(x_up, y_up),
                upper_batch_size=6,
                shuffle=False,
                verbose=0,
            )
        else:
            expected_loss = to_numpy(loss(w, m, x, y, 0.1))
            logs = model.train_on_batch(
                x, y, upper_data=(x_up, y_up), return_dict=True
            )
            self.assertEqual(set(logs), {"loss", "upper_loss"})
            self.assertAllClose(logs["loss"], expected_loss, atol=1e-6)
        for variable, expected in zip(w_vars, expected_w):
            self.assertAllClose(variable, expected, atol=1e-5, rtol=1e-5)
        for variable, expected, start in zip(m_vars, expected_m, m_start):
            self.assertAllClose(variable, expected, atol=atol, rtol=rtol)
            self.assertNotAllClose(variable, start, atol=1e-3)
        self.assertUnchanged(before, snapshot(model), FROZEN)

    def test_train_on_batch_without_upper_data_is_a_lower_step(self):
        # The direction and the head move along the lower gradient (task
        # loss + penalty, autodiff here); the magnitudes stay, as in the
        # retrain phase, and no upper loss is reported.
        x, y = make_data(8)
        rate = 0.3
        model = self.compiled(
            optimizer=keras.optimizers.SGD(rate), direction_regularization=0.1
        )
        trainable = model.trainable_variables
        w_vars = [v for v in trainable if not v.path.endswith("magnitude")]

        def lower_loss(w):
            mapping = list(zip(w_vars, w))
            with keras.StatelessScope(state_mapping=mapping):
                error = keras.ops.subtract(model(x), y)
                return keras.ops.mean(
                    keras.ops.square(error)
                ) + 0.1 * bidora_dense.direction_regularization(
                    model.adapted_layers
                )

        w = [keras.ops.convert_to_tensor(v.value) for v in w_vars]
        expected_loss = to_numpy(lower_loss(w))
        expected_w = [
            to_numpy(wi) - rate * to_numpy(gi)
            for wi, gi in zip(w, grad(lower_loss, w))
        ]
        before = snapshot(model)
        loss = model.train_on_batch(x, y)
        self.assertAllClose(loss, expected_loss, atol=1e-6)
        for variable, expected in zip(w_vars, expected_w):
            self.assertAllClose(variable, expected, atol=1e-5, rtol=1e-5)
        self.assertUnchanged(before, snapshot(model), MAGNITUDE + FROZEN)
        self.assertEqual(int(to_numpy(model.upper_optimizer.iterations)), 0)

    def test_train_on_batch_of_dora_is_one_joint_step(self):
        # method="dora": Keras's train_on_batch, both parts along one
        # gradient (autodiff here).
        x, y = make_data(8)
        rate = 0.3
        model = self.compiled(
            method="dora",
            optimizer=keras.optimizers.SGD(rate),
            upper_optimizer=keras.optimizers.SGD(rate),
            direction_regularization=0,
        )
        variables = model.trainable_variables

        def task_loss(values):
            mapping = list(zip(variables, values))
            with keras.StatelessScope(state_mapping=mapping):
                error = keras.ops.subtract(model(x), y)
                return keras.ops.mean(keras.ops.square(error))

        values = [keras.ops.convert_to_tensor(v.value) for v in variables]
        expected = [
            to_numpy(v) - rate * to_numpy(g)
            for v, g in zip(values, grad(task_loss, values))
        ]
        model.train_on_batch(x, y)
        for variable, value in zip(variables, expected):
            self.assertAllClose(variable, value, atol=1e-5, rtol=1e-5)

    def test_optimizer_iterations_count_steps(self):
        # 6 lower steps per epoch, an upper step at steps 1, 3 and 5.
        x, y = make_data(30)
        model = self.compiled(upper_every=2)
        model.fit(x, y, batch_size=4, epochs=2, verbose=0)
        self.assertEqual(int(to_numpy(model.lower_optimizer.iterations)), 12)
        self.assertEqual(int(to_numpy(model.upper_optimizer.iterations)), 6)
        # Keras's own step counter (callbacks such as TensorBoard read it).
        self.assertEqual(int(to_numpy(model.optimizer.iterations)), 12)

    def test_dora_moves_magnitudes_and_directions_in_one_step(self):
        x, y = make_data(8)
        model = self.compiled(method="dora")
        before = snapshot(model)
        model.fit(x, y, batch_size=8, verbose=0)
        after = snapshot(model)
        self.assertChanged(before, after, MAGNITUDE + DIRECTION + HEAD)
        self.assertUnchanged(before, after, FROZEN)

    def test_retrain_as_first_fit(self):
        # No bi-level phase before: retrain alone builds what it needs.
        x, y = make_data(8)
        model = self.compiled()
        before = snapshot(model)
        model.retrain(
            x, y, batch_size=8, reinitialize_direction=False, verbose=0
        )
        after = snapshot(model)
        self.assertChanged(before, after, DIRECTION + HEAD)
        self.assertUnchanged(before, after, MAGNITUDE + FROZEN)

    def test_reinitialized_retrain_trains_like_a_new_optimizer(self):
        # After a bi-level phase has advanced Adam (with moving averages of
        # the weights), a retrain that re-initialises the direction must
        # train as Keras's fit does with a new optimizer of the same config
        # from the re-initialised weights, the magnitudes frozen.
        x, y = make_data(24)

        def adam():
            return keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5)

        model = self.compiled(optimizer=adam(), direction_regularization=0)
        model.fit(x, y, batch_size=4, epochs=2, verbose=0)
        self.assertEqual(int(to_numpy(model.lower_optimizer.iterations)), 10)
        start = {}
        snap = keras.callbacks.LambdaCallback(
            on_train_begin=lambda logs: start.update(snapshot(model))
        )
        model.retrain(
            x, y, epochs=2, batch_size=4, shuffle=False, callbacks=[snap]
        )
        trained = snapshot(model)

        reference = build_base()
        for variable in reference.weights:
            variable.assign(start[variable.path])
            if variable.path.endswith(MAGNITUDE):
                variable.trainable = False
        reference.compile(optimizer=adam(), loss="mse")
        reference.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        self.assertChanged(start, trained, DIRECTION + HEAD)
        for variable in reference.weights:
            self.assertAllClose(
                trained[variable.path],
                to_numpy(variable),
                atol=1e-5,
                msg=variable.path,
            )

    # The same run on every backend ----------------------------------------

    @pytest.mark.large
    @pytest.mark.skipif(
        keras.config.backend() != "jax",
        reason="it runs the three backends in subprocesses, whatever the "
        "backend of the test run: the JAX test run runs it",
    )
    def test_same_losses_on_all_backends(self):
        processes = {
            backend: subprocess.Popen(
                [sys.executable, "-m", "tests.test_bidora_model"],
                cwd=REPO_ROOT,
                env={
                    **os.environ,
                    "KERAS_BACKEND": backend,
                    "TF_CPP_MIN_LOG_LEVEL": "3",
                },
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for backend in ("jax", "tensorflow", "torch")
        }
        results = {}
        for backend, process in processes.items():
            stdout, stderr = process.communicate(timeout=300)
            self.assertEqual(process.returncode, 0, msg=stderr[-3000:])
            results[backend] = json.loads(stdout.strip().splitlines()[-1])
        reference = results["jax"]
        for name, logs in reference.items():
            for key, values in logs.items():
                self.assertLen(values, 20)
                self.assertTrue(np.all(np.isfinite(values)))
            # The run trains: the last epoch's mean loss is lower.
            self.assertLess(logs["loss"][-1], logs["loss"][3])
        for backend in ("tensorflow", "torch"):
            for name, logs in reference.items():
                for key, values in logs.items():
                    self.assertAllClose(
                        results[backend][name][key],
                        values,
                        atol=1e-5,
                        rtol=1e-4,
                        msg=f"{backend} {name} {key}",
                    )

    # Saving --------------------------------------------------------------

    def injected_model(self, seed=0):
        model = BiDoRAModel(
            build_plain_base(seed),
            rank=2,
            targets=["first", "second"],
            detach_norm=False,
            hypergradient="first_order",
            upper_every=3,
            upper_fraction=0.2,
            seed=7,
        )
        # inject draws lora_a at random: set every weight from the seed.
        set_weights(model.model, seed)
        model.compile(
            optimizer=keras.optimizers.AdamW(0.02),
            upper_optimizer=keras.optimizers.AdamW(0.01, weight_decay=0.01),
            loss="mse",
            metrics=["mae"],
        )
        return model

    def test_save_load_resume_equals_uninterrupted_training(self):
        # 45 samples: 9 upper (batches of 4, 4, 1), 36 lower (9 steps, an
        # upper step at steps 1, 4 and 7, each on a different upper batch).
        x, y = make_data(45)
        fit_kwargs = dict(batch_size=4, shuffle=True, verbose=0)

        straight = self.injected_model()
        straight.fit(x, y, epochs=4, **fit_kwargs)

        first = self.injected_model()
        first.fit(x, y, epochs=2, **fit_kwargs)
        path = os.path.join(self.get_temp_dir(), "model.keras")
        first.save(path)
        restored = keras.saving.load_model(path)
        self.assertIsInstance(restored, BiDoRAModel)
        self.assertEqual(snapshot(restored).keys(), snapshot(first).keys())
        for path_, value in snapshot(first).items():
            self.assertAllClose(snapshot(restored)[path_], value, atol=0)
        self.assertAllClose(
            restored.optimizer.variables, first.optimizer.variables, atol=0
        )
        restored.fit(x, y, initial_epoch=2, epochs=4, **fit_kwargs)

        expected = snapshot(straight)
        resumed = snapshot(restored)
        self.assertChanged(snapshot(first), resumed, MAGNITUDE + DIRECTION)
        for path_, value in expected.items():
            self.assertAllClose(resumed[path_], value, atol=1e-6, rtol=1e-6)
        self.assertAllClose(
            restored.optimizer.variables,
            straight.optimizer.variables,
            atol=1e-6,
            rtol=1e-6,
        )

    def test_config_round_trip(self):
        model = self.injected_model()
        config = model.get_config()
        restored = BiDoRAModel.from_config(json.loads(json.dumps(config)))
        self.assertEqual(
            json.loads(json.dumps(restored.get_config())),
            json.loads(json.dumps(config)),
        )
        for name in ("upper_fraction", "hypergradient", "upper_every", "seed"):
            self.assertEqual(getattr(restored, name), getattr(model, name))
        # The injection settings come back too.
        for name in ("rank", "targets", "layer_kwargs"):
            self.assertEqual(getattr(restored, name), getattr(model, name))
        self.assertEqual(
            [v.path for v in restored.weights], [v.path for v in model.weights]
        )

    def test_adapters_built_by_hand_save_and_resume(self):
        # No inject record: the functional model with its BiDoRADense
        # layers is serialized as it is, and loads without injecting.
        x, y = make_data(30)
        fit_kwargs = dict(batch_size=4, shuffle=True, verbose=0)
        model = self.compiled(
            optimizer=keras.optimizers.Adam(0.02), upper_every=2, seed=3
        )
        model.fit(x, y, **fit_kwargs)
        path = os.path.join(self.get_temp_dir(), "by_hand.keras")
        model.save(path)
        restored = keras.saving.load_model(path)
        self.assertIsInstance(restored, BiDoRAModel)
        self.assertEqual((restored.upper_every, restored.seed), (2, 3))
        self.assertEqual(snapshot(restored).keys(), snapshot(model).keys())
        for path_, value in snapshot(model).items():
            self.assertAllClose(snapshot(restored)[path_], value, atol=0)
        # Both continue alike: same split, same optimizer states.
        model.fit(x, y, initial_epoch=1, epochs=2, **fit_kwargs)
        restored.fit(x, y, initial_epoch=1, epochs=2, **fit_kwargs)
        for path_, value in snapshot(model).items():
            self.assertAllClose(snapshot(restored)[path_], value, atol=1e-6)
        clone = keras.models.clone_model(model)
        self.assertEqual(
            [v.path for v in clone.weights], [v.path for v in model.weights]
        )

    # Data and callbacks --------------------------------------------------

    def test_fit_dict_inputs_validation_and_callbacks(self):
        rng = np.random.default_rng(4)
        x = {
            "a": rng.normal(size=(24, 3)).astype("float32"),
            "b": rng.normal(size=(24, 1)).astype("float32"),
        }
        y = rng.normal(size=(24, 2)).astype("float32")
        model = self.compiled(
            base=build_base(dict_inputs=True),
            compile_kwargs={"metrics": ["mae"]},
        )
        directory = self.get_temp_dir()
        weights_path = os.path.join(directory, "best.weights.h5")
        history = model.fit(
            x,
            y,
            batch_size=4,
            epochs=3,
            validation_data=(x, y),
            callbacks=[
                keras.callbacks.EarlyStopping(monitor="val_loss", patience=5),
                keras.callbacks.ModelCheckpoint(
                    weights_path, save_weights_only=True
                ),
            ],
            verbose=0,
        )
        self.assertEqual(
            set(history.history),
            {"loss", "upper_loss", "mae", "val_loss", "val_mae"},
        )
        self.assertLen(history.history["loss"], 3)
        # The checkpoint holds the final weights.
        trained = snapshot(model)
        other = self.compiled(
            base=build_base(seed=9, dict_inputs=True),
            compile_kwargs={"metrics": ["mae"]},
        )
        other.load_weights(weights_path)
        for path, value in snapshot(other).items():
            self.assertAllClose(value, trained[path], atol=0)
        # evaluate reports the compiled metrics, never upper_loss.
        results = model.evaluate(x, y, verbose=0, return_dict=True)
        self.assertEqual(set(results), {"loss", "mae"})

    def test_class_weight_weighs_both_levels(self):
        # The reference: the same training with the per-sample weights
        # written out in NumPy, at both levels (the held-out split of x,
        # or upper_data).
        x, _ = make_data(20)
        labels = (x[:, 0] > 0).astype("int32")
        class_weight = {0: 0.25, 1: 3.0}
        weights = np.where(labels == 1, 3.0, 0.25).astype("float32")
        x_up, labels_up, weights_up = x[:6] * 2, labels[:6], weights[:6]
        runs = {
            "fit": lambda model, **kw: model.fit(
                x, labels, batch_size=4, epochs=2, verbose=0, **kw
            ),
            "fit_upper_data": lambda model, **kw: model.fit(
                x, labels, batch_size=4, verbose=0, **kw
            ),
            "train_on_batch": lambda model, **kw: model.train_on_batch(
                x[:8], labels[:8], **kw
            ),
        }
        for name, run in runs.items():
            with self.subTest(name):
                upper = name != "fit"
                trained = []
                for weighted in (True, False):
                    model = BiDoRAModel(build_base(), seed=0)
                    model.compile(
                        optimizer=keras.optimizers.SGD(0.2),
                        loss=keras.losses.SparseCategoricalCrossentropy(
                            from_logits=True
                        ),
                    )
                    if weighted:
                        kwargs = {"class_weight": class_weight}
                        if upper:
                            kwargs["upper_data"] = (x_up, labels_up)
                    else:
                        kwargs = {"sample_weight": weights}
                        if name == "train_on_batch":
                            kwargs["sample_weight"] = weights[:8]
                        if upper:
                            kwargs["upper_data"] = (x_up, labels_up, weights_up)
                    run(model, **kwargs)
                    trained.append(snapshot(model))
                for path, value in trained[1].items():
                    self.assertAllClose(
                        trained[0][path], value, atol=1e-6, msg=path
                    )

    def test_learning_rate_callbacks_reach_both_levels(self):
        # Keras's callbacks treat the MultiOptimizer's sub-optimizers one by
        # one, logging each rate under its optimizer's name: the upper
        # level's copy of the lower optimizer has a name of its own.
        x, y = make_data(10)
        model = BiDoRAModel(build_base(), seed=0)
        model.compile(optimizer=keras.optimizers.Adam(0.04), loss="mse")
        reduce = keras.callbacks.ReduceLROnPlateau(
            monitor="loss", factor=0.5, patience=0, min_delta=1e9
        )
        history = model.fit(
            x, y, batch_size=4, epochs=3, callbacks=[reduce], verbose=0
        )
        # The first epoch sets the best loss; the next two miss the
        # (impossible) improvement: halved twice, each after its log.
        for optimizer in (model.lower_optimizer, model.upper_optimizer):
            self.assertAllClose(optimizer.learning_rate, 0.01, atol=1e-9)
        self.assertEqual(
            history.history["learning_rate_adam"],
            history.history["learning_rate_upper_adam"],
        )
        self.assertAllClose(
            history.history["learning_rate_upper_adam"], [0.04, 0.04, 0.02]
        )
        schedule = keras.callbacks.LearningRateScheduler(
            lambda epoch: 0.1 / (epoch + 1)
        )
        model.fit(x, y, batch_size=4, epochs=2, callbacks=[schedule], verbose=0)
        for optimizer in (model.lower_optimizer, model.upper_optimizer):
            self.assertAllClose(optimizer.learning_rate, 0.05, atol=1e-9)

    def test_early_stopping_stops_the_bilevel_phase(self):
        x, y = make_data(20)
        model = self.compiled(optimizer=keras.optimizers.SGD(0.0))
        history = model.fit(
            x,
            y,
            batch_size=4,
            epochs=10,
            callbacks=[
                # The lower loss cannot improve with a zero learning rate
                # except through m; a huge min_delta stops after patience.
                keras.callbacks.EarlyStopping(
                    monitor="loss", patience=1, min_delta=100.0
                )
            ],
            verbose=0,
        )
        self.assertLen(history.history["loss"], 2)

    def test_model_checkpoint_keras_file(self):
        x, y = make_data(20)
        model = self.injected_model()
        path = os.path.join(self.get_temp_dir(), "epoch_{epoch}.keras")
        model.fit(
            x,
            y,
            batch_size=4,
            epochs=2,
            callbacks=[keras.callbacks.ModelCheckpoint(path)],
            verbose=0,
        )
        restored = keras.saving.load_model(path.format(epoch=2))
        self.assertIsInstance(restored, BiDoRAModel)
        self.assertAllClose(restored.predict(x, verbose=0), model(x), atol=1e-6)

    def test_export_serves_what_the_model_computes(self):
        # Injected adapters are exported merged into plain layers; adapters
        # built by hand, as they are. Either way the artifact, loaded by
        # TensorFlow or torch alone, computes the adapted forward pass.
        x, y = make_data(20)
        for name, model, merged in (
            ("injected", self.injected_model(), True),
            ("built_by_hand", self.compiled(), False),
        ):
            model.fit(x, y, batch_size=4, verbose=0)
            path = os.path.join(self.get_temp_dir(), name)
            if keras.config.backend() == "torch":
                import torch

                spec = keras.InputSpec(shape=x.shape, dtype="float32")
                model.export(
                    path + ".pt2",
                    format="torch",
                    input_signature=[spec],
                    verbose=False,
                )
                program = torch.export.load(path + ".pt2")
                names = list(program.state_dict)
                outputs = program.module()(torch.from_numpy(x))
            else:
                import tensorflow as tf

                model.export(path, verbose=False)
                loaded = tf.saved_model.load(path)
                names = [variable.name for variable in loaded.variables]
                outputs = loaded.serve(tf.constant(x))
            self.assertAllClose(
                to_numpy(outputs), to_numpy(model(x)), atol=1e-5, msg=name
            )
            holds_adapters = any("lora_a" in str(n) for n in names)
            self.assertEqual(holds_adapters, not merged, msg=f"{name}: {names}")

    def test_fit_tf_data(self):
        import tensorflow as tf

        x, y = make_data(40)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
        model = self.compiled(compile_kwargs={"metrics": ["mae"]})
        before = snapshot(model)
        logger = BatchLogger()
        history = model.fit(dataset, epochs=2, callbacks=[logger], verbose=0)
        self.assertEqual(set(history.history), {"loss", "upper_loss", "mae"})
        # 10 batches: 2 go to the upper split, 8 are lower steps per epoch.
        self.assertLen(logger.logs, 16)
        self.assertChanged(before, snapshot(model), MAGNITUDE + DIRECTION)

    def test_fit_py_dataset_with_py_dataset_upper_data(self):
        x, y = make_data(24)
        x_up, y_up = make_data(12, seed=2)
        model = self.compiled(hypergradient="first_order")
        initial_upper_loss = float(
            np.mean((to_numpy(model(x_up[:4])) - y_up[:4]) ** 2)
        )
        logger = BatchLogger()
        model.fit(
            ArrayPyDataset(x, y, batch_size=4),
            upper_data=ArrayPyDataset(x_up, y_up, batch_size=4),
            shuffle=False,
            callbacks=[logger],
            verbose=0,
        )
        # All of x is lower data: 6 steps. The first upper loss is the
        # first upper batch's, at the initial weights (first_order).
        self.assertLen(logger.logs, 6)
        self.assertAllClose(
            logger.logs[0]["upper_loss"], initial_upper_loss, rtol=1e-5
        )

    def test_fit_with_explicit_upper_data(self):
        x, y = make_data(12)
        x_up, y_up = make_data(5, seed=2)
        model = self.compiled(hypergradient="first_order")
        expected = []
        for start in (0, 2, 4):
            part = slice(start, start + 2)
            expected.append(
                float(np.mean((to_numpy(model(x_up[part])) - y_up[part]) ** 2))
            )
        logger = BatchLogger()
        model.fit(
            x,
            y,
            batch_size=12,
            upper_data=(x_up, y_up),
            upper_batch_size=2,
            shuffle=False,
            callbacks=[logger],
            verbose=0,
        )
        # One lower batch of 12 (all of x), the first upper batch of 2.
        self.assertLen(logger.logs, 1)
        self.assertAllClose(
            logger.logs[0]["upper_loss"], expected[0], rtol=1e-5
        )
        self.assertNotAllClose(expected[0], expected[1])

    # Errors --------------------------------------------------------------

    def test_invalid_arguments(self):
        base = build_base()
        for upper_fraction in (0, 1, 1.5, -0.2):
            with self.assertRaisesRegex(ValueError, "upper_fraction"):
                BiDoRAModel(base, upper_fraction=upper_fraction)
        with self.assertRaisesRegex(ValueError, "hypergradient must be one"):
            BiDoRAModel(base, hypergradient="implicit")
        with self.assertRaisesRegex(ValueError, "upper_every"):
            BiDoRAModel(base, upper_every=0)
        with self.assertRaisesRegex(ValueError, "neumann_terms"):
            BiDoRAModel(base, neumann_terms=-1)
        with self.assertRaisesRegex(ValueError, "method"):
            BiDoRAModel(base, method="lora")
        with self.assertRaisesRegex(ValueError, "keras.Model"):
            BiDoRAModel(keras.layers.Dense(2))

    def test_empty_upper_split(self):
        model = self.compiled(upper_fraction=0.1)
        x, y = make_data(3)
        with self.assertRaisesRegex(ValueError, "upper split"):
            model.fit(x, y, batch_size=2, verbose=0)
        model = self.compiled(base=build_base(), upper_fraction=0.9)
        with self.assertRaisesRegex(ValueError, "lower split"):
            model.fit(x, y, batch_size=2, verbose=0)

    def test_unsupported_fit_arguments(self):
        model = self.compiled()
        x, y = make_data(10)
        start = snapshot(model)
        with self.assertRaisesRegex(ValueError, "cannot both be given"):
            model.fit(x, y, sample_weight=y[:, 0], class_weight={0: 1.0})
        with self.assertRaisesRegex(ValueError, "x of type ArrayPyDataset"):
            model.fit(ArrayPyDataset(x, y, 2), class_weight={0: 1.0})
        with self.assertRaisesRegex(ValueError, "steps_per_epoch"):
            model.fit(x, y, steps_per_epoch=2, verbose=0)
        batches = ((x[i : i + 2], y[i : i + 2]) for i in range(0, 10, 2))
        with self.assertRaisesRegex(ValueError, "x of type generator"):
            model.fit(batches, verbose=0)
        dataset = ArrayPyDataset(x, y, batch_size=2)
        for phase in (model.fit, model.retrain):
            with self.assertRaisesRegex(ValueError, "x of type ArrayPy"):
                phase(dataset, validation_split=0.2, verbose=0)
        with self.assertRaisesRegex(ValueError, "cannot both be given"):
            model.train_on_batch(
                x, y, upper_data=(x, y, y[:, 0]), class_weight={0: 1.0}
            )
        with self.assertRaisesRegex(ValueError, "upper_data of type ndarray"):
            model.train_on_batch(x, y, upper_data=x)
        with self.assertRaisesRegex(ValueError, "same kind of features"):
            model.train_on_batch(x, y, upper_data=({"a": x}, y))
        dora = self.compiled(base=build_base(), method="dora")
        with self.assertRaisesRegex(ValueError, "method='dora'"):
            dora.train_on_batch(x, y, upper_data=(x, y))
        # Nothing was trained, nor re-initialised by retrain, on the way.
        self.assertUnchanged(start, snapshot(model), MAGNITUDE + DIRECTION)

    def test_compile_errors(self):
        model = BiDoRAModel(build_base(magnitude=False))
        with self.assertRaisesRegex(ValueError, "magnitude"):
            model.compile(optimizer="sgd", loss="mse")
        optimizer = keras.optimizers.SGD(0.1)
        model = BiDoRAModel(build_base())
        with self.assertRaisesRegex(ValueError, "two different"):
            model.compile(
                optimizer=optimizer, upper_optimizer=optimizer, loss="mse"
            )

    def test_evaluate_and_predict_share_the_column_norms(self):
        # Two adapters of one shape: evaluate and predict compute their
        # column norms together (stacked), and still give each layer's own
        # DoRA output, checked against NumPy.
        inputs = keras.Input((4,), name="x")
        hidden = adapter(4, 4, "first")(inputs)
        hidden = keras.layers.Activation("tanh")(hidden)
        hidden = adapter(4, 4, "second")(hidden)
        base = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
        set_weights(base, seed=4)
        model = self.compiled(base)
        x, y = make_data(10)

        def numpy_dora(layer, values):
            kernel = to_numpy(layer.layer.kernel)
            direction = kernel + layer.scale * (
                to_numpy(layer.lora_a) @ to_numpy(layer.lora_b)
            )
            kernel = direction * (
                to_numpy(layer.magnitude) / np.linalg.norm(direction, axis=0)
            )
            return values @ kernel + to_numpy(layer.layer.bias)

        first, second = model.adapted_layers
        head = base.get_layer("head")
        expected = numpy_dora(second, np.tanh(numpy_dora(first, x)))
        expected = expected @ to_numpy(head.kernel) + to_numpy(head.bias)

        original = bidora_dense._norm_parts

        def run(method, *args):
            """`method(*args)` and, for each norm computation made inside a
            step (Keras's own symbolic build calls the model outside any),
            whether it was stacked."""
            stacked = []

            def recording(*args):
                if bidora_dense._SharedNorms.active():
                    stacked.append(len(args[2].shape) == 3)
                return original(*args)

            with mock.patch.object(bidora_dense, "_norm_parts", recording):
                result = method(*args, batch_size=5, verbose=0)
            self.assertNotEmpty(stacked, msg=method.__name__)
            self.assertTrue(all(stacked), msg=method.__name__)
            return result

        self.assertAllClose(run(model.predict, x), expected, atol=1e-5)
        self.assertAllClose(
            run(model.evaluate, x, y),
            np.mean(np.square(expected - y)),
            atol=1e-5,
            rtol=1e-5,
        )

    def test_model_without_adapters(self):
        inputs = keras.Input((4,))
        plain = keras.Model(inputs, keras.layers.Dense(2, name="out")(inputs))
        # Nothing matches the default targets, so nothing can be adapted.
        with self.assertRaisesRegex(ValueError, "target"):
            BiDoRAModel(plain)

    def test_non_finite_loss_stops_with_the_last_good_weights(self):
        # Lower batches of 4 in order: sample 9 is in the third lower batch;
        # upper batches of 4 in order with one upper step per lower step:
        # the third upper batch holds upper sample 9 too.
        x, y = make_data(16)
        x_up, y_up = make_data(12, seed=2)
        y_nan, y_up_nan = y.copy(), y_up.copy()
        y_nan[9, 0] = np.nan
        y_up_nan[9, 1] = np.nan
        fit_kwargs = dict(batch_size=4, shuffle=False, verbose=0)

        def new_model():
            return self.compiled(
                optimizer=keras.optimizers.Adam(0.05),
                upper_optimizer=keras.optimizers.Adam(0.05),
            )

        # Two clean steps (the NaN samples are not reached).
        reference = new_model()
        reference.fit(x[:8], y[:8], upper_data=(x_up, y_up_nan), **fit_kwargs)
        expected = snapshot(reference)
        expected_optimizer = [
            to_numpy(v) for v in reference.optimizer.variables
        ]

        for level, lower_y, upper_y in (
            ("lower", y_nan, y_up),
            ("upper", y, y_up_nan),
        ):
            model = new_model()
            with self.assertRaisesRegex(
                FloatingPointError, f"The {level}-level loss.*epoch 1, step 3"
            ):
                model.fit(x, lower_y, upper_data=(x_up, upper_y), **fit_kwargs)
            weights = snapshot(model)
            for path, value in expected.items():
                self.assertAllClose(
                    weights[path], value, atol=1e-6, msg=f"{level}: {path}"
                )
            self.assertAllClose(
                model.optimizer.variables, expected_optimizer, atol=1e-6
            )


if __name__ == "__main__":
    print(json.dumps(reference_losses()))
