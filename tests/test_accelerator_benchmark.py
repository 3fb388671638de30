"""Tests of `benchmarks/accelerator.py`, run with `--tiny` on the CPU.

The benchmark covers JAX and torch; a run under `KERAS_BACKEND=tensorflow`
checks the torch rows. Each backend runs a few of its rows (one process
each) and, with `--peers`, PEFT's LoRA and DoRA on transformers' Llama when
`peft` and `transformers` are installed. TensorFlow is made unimportable in
the run, as on the accelerator image, which has none.

The trainable parameter counts are checked against the adapters' shapes
worked out from the model's settings, not read from the models.
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys

import keras
import pytest

from tests.test_case import TestCase
from tests.test_case import load_benchmark

accelerator = load_benchmark("accelerator")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK = 8
# A few rows per backend, to keep each run under a minute on 2 CPU cores.
KERAS_ROWS = {
    "jax": ["keras_lora", "lora", "first_order"],
    "torch": ["keras_lora", "dora", "darts"],
}


def _projection_shapes(model):
    """`(input, heads, head size)` of the query and value projections."""
    hidden = model["hidden_dim"]
    head_size = hidden // model["num_query_heads"]
    return [
        (hidden, model["num_query_heads"], head_size),
        (hidden, model["num_key_value_heads"], head_size),
    ]


def expected_trainable_parameters(method, model, rank):
    """The adapters' size on the query and value projections of each layer.

    keras-bidora and PEFT factor each projection as a matrix, `(in, rank)`
    and `(rank, out)`, DoRA adding one magnitude per output; Keras's LoRA
    factors a `(in, heads, head size)` kernel as `(in, heads, rank)` and
    `(rank, head size)`.
    """
    per_layer = 0
    for inputs, heads, head_size in _projection_shapes(model):
        outputs = heads * head_size
        if method == "keras_lora":
            per_layer += inputs * heads * rank + rank * head_size
        elif method in ("lora", "peft_lora"):
            per_layer += rank * (inputs + outputs)
        else:
            per_layer += rank * (inputs + outputs) + outputs
    return model["num_layers"] * per_layer


def _peers_installed():
    return all(
        importlib.util.find_spec(name) is not None
        for name in accelerator.PEER_PACKAGES
    )


def _without_tensorflow(folder):
    """A folder to put first on `PYTHONPATH` that hides TensorFlow."""
    package = os.path.join(folder, "tensorflow")
    os.makedirs(package)
    with open(os.path.join(package, "__init__.py"), "w") as f:
        f.write('raise ImportError("TensorFlow is hidden in this test")\n')
    return folder


@pytest.mark.large
class AcceleratorRunTest(TestCase):
    @pytest.mark.skipif(
        keras.config.backend() not in KERAS_ROWS,
        reason="the script runs on JAX and torch only; the torch test run "
        "makes its torch rows",
    )
    def test_tiny_run_with_peers(self):
        backend = keras.config.backend()
        methods = KERAS_ROWS[backend]
        output = os.path.join(self.get_temp_dir(), "results")
        hidden = _without_tensorflow(os.path.join(self.get_temp_dir(), "tf"))
        path = [hidden, REPO, os.environ.get("PYTHONPATH", "")]
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, path)),
            TF_CPP_MIN_LOG_LEVEL="3",
            # The tiny model costs mostly compilation (as in conftest.py).
            JAX_DISABLE_MOST_OPTIMIZATIONS="true",
        )
        process = subprocess.run(
            [
                sys.executable,
                os.path.join(REPO, "benchmarks", "accelerator.py"),
                "--backends",
                backend,
                "--methods",
                ",".join(methods),
                "--peers",
                "--tiny",
                "--output",
                output,
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(process.returncode, 0, msg=process.stderr[-5000:])
        rows = [
            json.loads(line)
            for line in process.stdout.splitlines()
            if line.startswith("{")
        ]

        peers = _peers_installed()
        if peers:
            methods = methods + list(accelerator.PEER_ROWS)
        else:
            self.assertIn("peft", process.stderr)
        self.assertEqual([row["method"] for row in rows], methods)
        settings = accelerator.TINY
        for row in rows:
            peer = row["method"] in accelerator.PEER_ROWS
            self.assertEqual(row["backend"], "torch" if peer else backend)
            self.assertEqual(
                row["trainable_parameters"],
                expected_trainable_parameters(
                    row["method"], settings["model"], RANK
                ),
                msg=row["method"],
            )
            self.assertGreater(row["parameters"], row["trainable_parameters"])
            self.assertGreater(row["step_time_s"], 0)
            self.assertLen(row["warmup_step_times_s"], 1)
            self.assertLen(row["step_times_s"], 3)
            self.assertGreater(row["peak_memory_bytes"], 0)
            self.assertTrue(row["device"])
            self.assertTrue(row["date"])

        with open(os.path.join(output, "accelerator.jsonl")) as f:
            self.assertEqual([json.loads(line) for line in f], rows)
        with open(os.path.join(output, "accelerator.md")) as f:
            table = [line for line in f if line.startswith("| ")]
        # The header line, then one line per row, in order.
        self.assertLen(table, 1 + len(rows))
        for line, row in zip(table[1:], rows):
            self.assertTrue(line.startswith(f"| {row['implementation']} |"))
        self.assertIn("| 1.00 |", table[1])


class AcceleratorResultsTest(TestCase):
    def _args(self, argv):
        return argparse.Namespace(
            backends=["torch"],
            methods=[],
            peers=True,
            rank=RANK,
            dtype="bfloat16",
            tiny=True,
            output=None,
            row_timeout=1,
            argv=argv,
        )

    def test_missing_peer_package_is_named_and_its_rows_skipped(self):
        original = accelerator.missing_peer_packages
        accelerator.missing_peer_packages = lambda: ["peft"]
        self.addCleanup(setattr, accelerator, "missing_peer_packages", original)
        args = self._args(["--peers", "--tiny"])
        args.output = self.get_temp_dir()
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout):
            with contextlib.redirect_stderr(stderr):
                status = accelerator.run(args)
        self.assertEqual(status, 0)
        self.assertEqual(stdout.getvalue(), "")
        skipped = stderr.getvalue().splitlines()[0]
        self.assertIn("--peers", skipped)
        self.assertIn("peft not installed", skipped)

    def test_tiny_run_keeps_the_committed_results(self):
        args = self._args(["--tiny"])
        folder = accelerator._output_folder(args)
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        self.assertNotEqual(
            os.path.realpath(folder), os.path.realpath(accelerator.RESULTS)
        )
        args.tiny = False
        self.assertEqual(accelerator._output_folder(args), accelerator.RESULTS)

    def test_ratios_are_to_keras_lora_on_the_same_backend(self):
        def row(method, backend, step):
            return {
                "method": method,
                "implementation": accelerator.IMPLEMENTATIONS[method],
                "backend": backend,
                "step_time_s": step,
                "warmup_step_times_s": [10.0],
                "peak_memory_bytes": 2e9,
                "peak_memory_source": "device",
                "trainable_parameters": 1000,
                "device": "NVIDIA H200",
            }

        rows = [
            row("keras_lora", "jax", 0.5),
            row("darts", "jax", 1.5),
            row("keras_lora", "torch", 2.0),
            row("peft_lora", "torch", 1.0),
            {
                "method": "dora",
                "implementation": accelerator.IMPLEMENTATIONS["dora"],
                "backend": "torch",
                "error": "exit code 1",
            },
        ]
        header = {
            "date": "today",
            "command": "python benchmarks/accelerator.py",
            "settings": accelerator.TINY,
            "rank": RANK,
            "dtype": "bfloat16",
        }
        table = [
            line.split(" | ")
            for line in accelerator.markdown(rows, header).splitlines()
            if line.startswith("| ")
        ][1:]
        ratios = [cells[3] for cells in table[:4]]
        self.assertEqual(ratios, ["1.00", "3.00", "1.00", "0.50"])
        self.assertEqual(table[0][4], "2.00")
        self.assertIn("failed: exit code 1", table[4][2])
