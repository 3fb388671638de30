"""Tests of `benchmarks/xla_memory.py`, run with `--tiny` on the CPU.

The script compiles the train step of each method on JAX and reports XLA's
buffer sizes; the trainable parameter counts are checked against the
adapters' shapes worked out from the model's settings, and the argument
size against a lower bound from the parameter counts.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

from tests.test_accelerator_benchmark import expected_trainable_parameters
from tests.test_case import TestCase
from tests.test_case import load_benchmark

xla_memory = load_benchmark("xla_memory")

SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "benchmarks",
    "xla_memory.py",
)


@pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="the script compiles with JAX in its own processes, whatever "
    "the host backend: CI runs it once, under JAX",
)
class XlaMemoryBenchmarkTest(TestCase):
    def test_tiny_run_reports_each_method(self):
        methods = ["dora", "darts"]
        done = subprocess.run(
            [sys.executable, SCRIPT, "--tiny", "--methods", *methods],
            capture_output=True,
            text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        rows = [json.loads(line) for line in done.stdout.splitlines()]
        self.assertEqual([row["method"] for row in rows], methods)
        model = xla_memory._settings(True, None)["model"]
        for row in rows:
            trainable = expected_trainable_parameters(
                row["method"], model, xla_memory.RANK
            )
            self.assertEqual(row["trainable_parameters"], trainable)
            # Every weight is at least bfloat16 and each trainable one has
            # AdamW's two float32 slots besides; the batch comes on top.
            self.assertGreaterEqual(
                row["argument_bytes"], 2 * row["parameters"] + 8 * trainable
            )
            # The state's buffers are donated to its new values.
            self.assertLessEqual(row["alias_bytes"], row["argument_bytes"])
            self.assertGreater(row["alias_bytes"], 0)
            self.assertGreater(row["temp_bytes"], 0)
            self.assertEqual(row["layers"], model["num_layers"])

    def test_layers_replace_the_settings_depth(self):
        settings = xla_memory._settings(False, 6)
        self.assertEqual(settings["model"]["num_layers"], 6)
        self.assertEqual(
            settings["model"]["hidden_dim"],
            xla_memory.accelerator.FULL["model"]["hidden_dim"],
        )
        self.assertEqual(xla_memory.accelerator.FULL["model"]["num_layers"], 16)
