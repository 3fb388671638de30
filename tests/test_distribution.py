"""BiDoRAModel on several devices, against single-device training.

The devices must be configured before the backend starts (JAX's virtual CPU
devices through `XLA_FLAGS`, TensorFlow's logical CPU devices through
`tf.config.set_logical_device_configuration`), so each multi-device
training runs in a subprocess, on the outer run's backend:

- under `KERAS_BACKEND=jax`, `keras.distribution.DataParallel` over 4
  devices and `ModelParallel` over a 2 x 2 mesh;
- under `KERAS_BACKEND=tensorflow`, `tf.distribute.MirroredStrategy` over
  2 logical CPU devices;
- under `KERAS_BACKEND=torch`, which has no Keras multi-device training
  (multi-GPU torch is left to DDP outside Keras), nothing: the TensorFlow
  check would run again as it does under TensorFlow.

Each CI run thus pays for one subprocess under JAX and one under
TensorFlow. Each trains
the same tiny model (a `Dense` and an `EinsumDense` adapted) for 10 lower
steps with `first_order` and `darts`, and compares the per-step losses and
the final variables with single-device training in the same subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_bidora import BiDoRADense
from keras_bidora.distribution import adapter_axes
from keras_bidora.distribution import distribute_adapters
from tests.test_case import TestCase
from tests.test_case import to_numpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared by both subprocesses: the model, the data, a training run.
COMMON = """
import json
import keras
import numpy as np
from keras_bidora import BiDoRAModel

rng = np.random.default_rng(0)
# 80 lower samples (10 steps of 8) and 20 upper samples (5 batches of 4):
# every batch splits evenly over the devices.
x = rng.normal(size=(100, 4, 8)).astype("float32")
y = rng.normal(size=(100, 1)).astype("float32")


def base_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 8))
    hidden = keras.layers.EinsumDense(
        "btd,dhk->bthk", (4, 2, 4), name="query"
    )(inputs)
    hidden = keras.layers.Reshape((4, 8))(hidden)
    hidden = keras.layers.Dense(16, activation="relu", name="up")(hidden)
    hidden = keras.layers.Dense(8, name="down")(hidden)
    hidden = keras.layers.GlobalAveragePooling1D()(hidden)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(hidden))


class Losses(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        self.values.append(
            [float(logs["loss"]), float(logs["upper_loss"])]
        )


def train(hypergradient):
    model = BiDoRAModel(
        base_model(),
        rank=2,
        targets=["query", "up", "down"],
        hypergradient=hypergradient,
        upper_batch_size=4,
        seed=0,
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    losses = Losses()
    losses.values = []
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[losses])
    return model, losses.values


def weights(model):
    return {
        v.path: keras.ops.convert_to_numpy(v.value).tolist()
        for v in model.trainable_variables
    }
"""

JAX_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
{common}
devices = keras.distribution.list_devices()
mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), devices)
layout_map = keras.distribution.LayoutMap(mesh)
layout_map["query/kernel"] = (None, "model", None)
layout_map["up/kernel"] = (None, "model")
layout_map["down/kernel"] = ("model", None)
distributions = {{
    "single": None,
    "data_parallel": keras.distribution.DataParallel(devices=devices),
    "model_parallel": keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    ),
}}


def spec(variable):
    # Without trailing Nones: JAX writes a replicated axis either way.
    axes = [
        list(a) if isinstance(a, tuple) else a
        for a in variable.value.sharding.spec
    ]
    while axes and axes[-1] is None:
        axes.pop()
    return axes


results = {{"devices": len(devices)}}
for hypergradient in ("first_order", "darts"):
    for name, distribution in distributions.items():
        keras.distribution.set_distribution(distribution)
        model, losses = train(hypergradient)
        keras.distribution.set_distribution(None)
        result = {{"losses": losses, "weights": weights(model)}}
        if name == "model_parallel":
            result["specs"] = {{
                v.path: spec(v) for v in model.trainable_variables
            }}
            result["slot_specs"] = {{
                v.path: spec(v)
                for v in model.optimizer.variables
                if len(v.shape)
            }}
        results[f"{{hypergradient}}/{{name}}"] = result
print(json.dumps(results))
"""

TF_SCRIPT = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
{common}
strategies = {{
    "single": tf.distribute.get_strategy(),
    "mirrored": tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
}}
results = {{"devices": strategies["mirrored"].num_replicas_in_sync}}
for hypergradient in ("first_order", "darts"):
    for name, strategy in strategies.items():
        with strategy.scope():
            model, losses = train(hypergradient)
        results[f"{{hypergradient}}/{{name}}"] = {{
            "losses": losses,
            "weights": weights(model),
        }}
print(json.dumps(results))
"""


def run_script(script, backend, extra_env=None):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env.update(extra_env or {})
    code = textwrap.dedent(script).format(common=COMMON)
    process = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if process.returncode != 0:
        raise AssertionError(
            f"The subprocess failed (exit {process.returncode}):\n"
            f"{process.stderr[-5000:]}"
        )
    return json.loads(process.stdout.strip().splitlines()[-1])


class DistributionTest(TestCase):
    def assertMatchesSingleDevice(self, results, name, reference):
        got, expected = results[name], results[reference]
        self.assertLen(got["losses"], 10)
        # Float32 sums in another order: agreement to a few ulps per step.
        self.assertAllClose(
            got["losses"], expected["losses"], atol=1e-5, rtol=1e-5, msg=name
        )
        self.assertEqual(sorted(got["weights"]), sorted(expected["weights"]))
        for path, value in expected["weights"].items():
            self.assertAllClose(
                got["weights"][path], value, atol=1e-5, rtol=1e-5, msg=path
            )

    @pytest.mark.skipif(
        keras.config.backend() == "torch",
        reason="Keras has no multi-device torch path; the TensorFlow test "
        "run checks tf.distribute",
    )
    def test_multi_device_matches_single_device(self):
        if keras.config.backend() == "jax":
            self.check_jax_data_and_model_parallel()
        else:
            self.check_tensorflow_mirrored_strategy()

    def check_jax_data_and_model_parallel(self):
        results = run_script(JAX_SCRIPT, "jax")
        self.assertEqual(results["devices"], 4)
        for hypergradient in ("first_order", "darts"):
            reference = f"{hypergradient}/single"
            for name in ("data_parallel", "model_parallel"):
                self.assertMatchesSingleDevice(
                    results, f"{hypergradient}/{name}", reference
                )
            # Distributed training is not single-device training by
            # accident: the losses moved.
            losses = np.array(results[reference]["losses"])
            self.assertGreater(np.ptp(losses[:, 0]), 1e-2)

        specs = results["darts/model_parallel"]["specs"]
        # Adapters follow their kernels: A the input side, B and m the
        # output side; `down`'s kernel is sharded on its input side.
        # (Specs are written without trailing Nones.)
        expected = {
            "query/lora_a": [],
            "query/lora_b": [None, "model"],
            "query/magnitude": ["model"],
            "up/lora_a": [],
            "up/lora_b": [None, "model"],
            "up/magnitude": ["model"],
            "down/lora_a": ["model"],
            "down/lora_b": [],
            "down/magnitude": [],
        }
        for path, axes in expected.items():
            self.assertEqual(specs[path], axes, msg=path)
        # Both optimizers' slots take their variable's layout.
        slot_specs = results["darts/model_parallel"]["slot_specs"]
        self.assertLen(slot_specs, 2 * len(specs))
        for slot, axes in slot_specs.items():
            (path,) = [p for p in specs if p.replace("/", "_") + "_" in slot]
            self.assertEqual(axes, specs[path], msg=slot)

    def check_tensorflow_mirrored_strategy(self):
        results = run_script(TF_SCRIPT, "tensorflow")
        self.assertEqual(results["devices"], 2)
        for hypergradient in ("first_order", "darts"):
            self.assertMatchesSingleDevice(
                results,
                f"{hypergradient}/mirrored",
                f"{hypergradient}/single",
            )


class AdapterAxesTest(TestCase):
    def test_dense(self):
        dense = keras.layers.Dense(16)
        dense.build((None, 8))
        layer = BiDoRADense(dense, rank=2)
        layer.build()
        self.assertEqual(
            adapter_axes(layer, ("batch", "model")),
            {
                "lora_a": ("batch", None),
                "lora_b": (None, "model"),
                "magnitude": ("model",),
            },
        )

    def test_einsum_dense_flattened_sides(self):
        # A Gemma-style query kernel (heads, hidden, head_dim), laid out as
        # GemmaBackbone.get_layout_map does.
        query = keras.layers.EinsumDense("btd,ndh->btnh", (None, 4, 8))
        query.build((None, 3, 16))
        layer = BiDoRADense(query, rank=2)
        layer.build()
        self.assertEqual(
            adapter_axes(layer, ("model", "batch", None)),
            {
                "lora_a": ("batch", None),
                "lora_b": (None, "model"),
                "magnitude": ("model", None),
            },
        )
        # Sharding the trailing output axis does not flatten into
        # contiguous blocks: B is replicated, m keeps the exact layout.
        self.assertEqual(
            adapter_axes(layer, (None, None, "model")),
            {
                "lora_a": (None, None),
                "lora_b": (None, None),
                "magnitude": (None, "model"),
            },
        )

    def test_size_one_leading_axis_is_skipped(self):
        query = keras.layers.EinsumDense("btd,ndh->btnh", (None, 1, 8))
        query.build((None, 3, 16))
        layer = BiDoRADense(query, rank=2, magnitude=False)
        layer.build()
        self.assertEqual(
            adapter_axes(layer, (None, None, "model")),
            {"lora_a": (None, None), "lora_b": (None, "model")},
        )

    def test_no_distribution_is_a_no_op(self):
        dense = keras.layers.Dense(4)
        dense.build((None, 8))
        layer = BiDoRADense(dense, rank=2)
        layer.build()
        before = [to_numpy(v) for v in layer.weights]
        distribute_adapters(layer)
        for value, variable in zip(before, layer.weights):
            self.assertAllClose(variable, value)
