"""Tests of `benchmarks/speed.py`'s results files.

A run of a few rows replaces those rows on file and keeps the others; each
row's ratio must stay readable against the reference step it was divided
by, even when a later run replaces the reference row.
"""

import argparse
import json
import os

from tests.test_case import TestCase
from tests.test_case import load_benchmark

speed = load_benchmark("speed")


def _row(name, step_s, command, reference_s=None):
    row = {
        "name": name,
        "backend": "jax",
        "step_s": step_s,
        "peak_mb": 1.0,
        "trainable_params": 10,
        "command": command,
    }
    if reference_s is not None:
        key = (
            "ratio_to_base_inference"
            if name.endswith("inference")
            else "ratio_to_keras_lora"
        )
        row[key] = round(step_s / reference_s, 3)
    return row


class SpeedBenchmarkTest(TestCase):
    def _results_folder(self):
        """A temporary results folder for `speed._save`, and its args."""
        results = self.get_temp_dir()
        original = speed.RESULTS
        speed.RESULTS = results
        self.addCleanup(setattr, speed, "RESULTS", original)
        args = argparse.Namespace(
            batch_size=16, sequence_length=128, warmup=3, steps=5, rounds=1
        )
        return results, args

    def test_partial_run_keeps_each_rows_reference(self):
        results, args = self._results_folder()
        # An earlier run written before rows kept their reference.
        first = [
            _row("keras_lora", 2.0, "first", 2.0),
            _row("dora", 2.2, "first", 2.0),
            _row("base_inference", 0.5, "first", 0.5),
            _row("merged_inference", 0.55, "first", 0.5),
        ]
        with open(os.path.join(results, "speed-jax.json"), "w") as f:
            json.dump(first, f)
        # A later run of two rows, its Keras LoRA step slower.
        second = [
            dict(_row("keras_lora", 4.0, "second", 4.0), reference_step_s=4.0),
            dict(
                _row("bidora_darts_k4", 6.0, "second", 4.0),
                reference_step_s=4.0,
            ),
        ]
        rows = speed._save("jax", second, args)

        by_name = {row["name"]: row for row in rows}
        self.assertEqual(
            [row["name"] for row in rows],
            [name for name in speed.ROWS if name in by_name],
        )
        self.assertEqual(
            sorted(by_name),
            sorted(
                [
                    "keras_lora",
                    "dora",
                    "bidora_darts_k4",
                    "base_inference",
                    "merged_inference",
                ]
            ),
        )
        # The kept rows are still divided by the first run's reference.
        self.assertEqual(by_name["dora"]["reference_step_s"], 2.0)
        self.assertEqual(by_name["dora"]["ratio_to_keras_lora"], 1.1)
        self.assertEqual(by_name["merged_inference"]["reference_step_s"], 0.5)
        # The new rows by the second run's.
        self.assertEqual(by_name["keras_lora"]["step_s"], 4.0)
        self.assertEqual(by_name["bidora_darts_k4"]["reference_step_s"], 4.0)
        with open(os.path.join(results, "speed-jax.json")) as f:
            self.assertEqual(json.load(f), rows)
        with open(os.path.join(results, "speed-jax.md")) as f:
            table = f.read()
        self.assertIn("`first`", table)
        self.assertIn("`second`", table)
        self.assertIn("| dora | 2.2000 | 1.1 | 2.0000 |", table)
        self.assertIn("| bidora_darts_k4 | 6.0000 | 1.5 | 4.0000 |", table)

    def test_reference_of_a_row_from_another_command_is_not_guessed(self):
        results, args = self._results_folder()
        # The reference row on file came from another command than `dora`.
        first = [
            _row("keras_lora", 3.0, "other", 3.0),
            _row("dora", 2.2, "first", 2.0),
        ]
        with open(os.path.join(results, "speed-jax.json"), "w") as f:
            json.dump(first, f)
        rows = speed._save("jax", [], args)
        by_name = {row["name"]: row for row in rows}
        self.assertNotIn("reference_step_s", by_name["dora"])
        self.assertEqual(by_name["keras_lora"]["reference_step_s"], 3.0)
