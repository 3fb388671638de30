"""Tests of `benchmarks/speed.py`'s results files.

A run of a few rows replaces those rows on file and keeps the others; each
row's ratio must stay readable against the reference step it was divided
by, even when a later run replaces the reference row.
"""

import argparse
import json
import os

import keras

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
            batch_size=16,
            sequence_length=128,
            warmup=3,
            steps=5,
            rounds=1,
            one_process=False,
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
        self.assertIn("| dora | 2.2000 | 1.1 | <= 1.1 met | 2.0000 |", table)
        self.assertIn("| bidora_darts_k4 | 6.0000 | 1.5 |  | 4.0000 |", table)

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

    def test_targets_are_checked_and_misses_explained(self):
        results, args = self._results_folder()
        # The targets: DoRA <= 1.1x, first_order k4 <= 1.4x, darts
        # k1 <= 3.0x Keras LoRA; merged inference within 5% of the base.
        rows = [
            _row("keras_lora", 1.0, "run", 1.0),
            _row("dora", 1.12, "run", 1.0),
            _row("bidora_first_order_k4", 1.38, "run", 1.0),
            _row("bidora_darts_k1", 3.4, "run", 1.0),
            _row("bidora_darts_k4", 1.9, "run", 1.0),
            _row("base_inference", 0.5, "run", 0.5),
            _row("merged_inference", 0.47, "run", 0.5),
        ]
        saved = {row["name"]: row for row in speed._save("jax", rows, args)}
        self.assertFalse(saved["dora"]["target_met"])
        self.assertTrue(saved["bidora_first_order_k4"]["target_met"])
        self.assertFalse(saved["bidora_darts_k1"]["target_met"])
        # 0.94x the base model's step is as much a miss as 1.06x.
        self.assertFalse(saved["merged_inference"]["target_met"])
        self.assertEqual(saved["merged_inference"]["target"], "0.95-1.05")
        for name in ("keras_lora", "bidora_darts_k4", "base_inference"):
            self.assertNotIn("target", saved[name])
        with open(os.path.join(results, "speed-jax.json")) as f:
            on_file = {row["name"]: row for row in json.load(f)}
        self.assertFalse(on_file["bidora_darts_k1"]["target_met"])
        with open(os.path.join(results, "speed-jax.md")) as f:
            table = f.read()
        self.assertIn(
            "| bidora_darts_k1 | 3.4000 | 3.4 | <= 3.0 MISSED |", table
        )
        self.assertIn(
            "| bidora_first_order_k4 | 1.3800 | 1.38 | <= 1.4 met |", table
        )
        # Each missed row, and only those, says what is left.
        left = table.split("Missed targets, and what is left:")[1]
        self.assertIn("`bidora_darts_k1`: A `darts` step makes 4", left)
        self.assertIn("`dora`:", left)
        self.assertIn("`merged_inference`:", left)
        self.assertNotIn("`bidora_first_order_k4`", left)

    def test_a_row_without_its_reference_has_no_verdict(self):
        results, args = self._results_folder()
        rows = speed._save("jax", [_row("dora", 1.0, "run")], args)
        self.assertEqual(rows[0]["target"], "<= 1.1")
        self.assertIsNone(rows[0]["target_met"])
        with open(os.path.join(results, "speed-jax.md")) as f:
            table = f.read()
        self.assertIn("| dora | 1.0000 | None | <= 1.1 |", table)
        self.assertNotIn("Missed targets", table)

    def test_other_shapes_have_their_own_files(self):
        results, args = self._results_folder()
        speed._save("jax", [_row("dora", 1.0, "default", 1.0)], args)
        small = argparse.Namespace(**{**vars(args), "batch_size": 4})
        small.sequence_length = 32
        speed._save("jax", [_row("dora", 0.1, "small", 0.08)], small)
        with open(os.path.join(results, "speed-jax.json")) as f:
            self.assertEqual([r["command"] for r in json.load(f)], ["default"])
        with open(os.path.join(results, "speed-jax-b4-s32.json")) as f:
            self.assertEqual([r["step_s"] for r in json.load(f)], [0.1])
        with open(os.path.join(results, "speed-jax-b4-s32.md")) as f:
            self.assertIn("batch 4, sequence 32", f.read())

    def test_bidora_rows_carry_their_ratio_to_dora(self):
        measured = {
            "keras_lora": [1.0, 1.2, 1.1],
            "dora": [1.5, 1.4, 1.6],
            "bidora_first_order_k1": [3.3, 3.0, 3.1],
        }
        args = argparse.Namespace(
            rows=list(measured), rounds=1, json=True, one_process=False
        )
        outputs = {
            name: "RESULT "
            + json.dumps({"times": times, "steps_timed": 3, "peak_mb": 1.0})
            for name, times in measured.items()
        }

        def fake_run(command, **kwargs):
            name = command[command.index("--row") + 1]
            return argparse.Namespace(
                returncode=0, stdout=outputs[name] + "\n", stderr=""
            )

        args.batch_size, args.sequence_length = 16, 128
        args.warmup, args.steps = 3, 3
        original = speed.subprocess.run
        speed.subprocess.run = fake_run
        self.addCleanup(setattr, speed.subprocess, "run", original)
        rows = {row["name"]: row for row in speed.run_backend("jax", args)}
        # Medians 3.1 and 1.5, and 1.1 for the Keras LoRA reference.
        self.assertEqual(rows["bidora_first_order_k1"]["ratio_to_dora"], 2.067)
        self.assertEqual(
            rows["bidora_first_order_k1"]["ratio_to_keras_lora"], 2.818
        )
        self.assertNotIn("ratio_to_dora", rows["dora"])

    def test_every_bidora_row_name_parses(self):
        expected = {
            "bidora_first_order_k4": ("first_order", 4, False, None),
            "bidora_darts_forward_k1": ("darts_forward", 1, False, None),
            "bidora_int8_first_order_k1": ("first_order", 1, True, None),
            "bidora_first_order_proportional_k1": (
                "first_order",
                1,
                False,
                "proportional",
            ),
        }
        for name, (hypergradient, every, int8, upper) in expected.items():
            spec = speed._bidora_spec(name)
            self.assertEqual(spec["hypergradient"], hypergradient, msg=name)
            self.assertEqual(spec["upper_every"], every, msg=name)
            self.assertEqual(spec["int8"], int8, msg=name)
            self.assertEqual(spec["upper_batch_size"], upper, msg=name)
        for name in speed.ROWS:
            if name.startswith("bidora"):
                speed._bidora_spec(name)
        for name in ("bidora_first_order", "bidora_implicit_k1"):
            with self.assertRaisesRegex(ValueError, name):
                speed._bidora_spec(name)

    def test_one_process_runs_every_row_in_one_child_and_pools_them(self):
        # Two rounds, the second in reverse order, as the child prints them.
        printed = [
            ("keras_lora", [1.0, 1.2]),
            ("dora", [1.5, 1.4]),
            ("dora", [1.6, 1.3]),
            ("keras_lora", [1.1, 0.9]),
        ]
        stdout = "".join(
            "RESULT "
            + json.dumps(
                {
                    "name": name,
                    "times": times,
                    "faults": [4, 6],
                    "steps_timed": 2,
                    "peak_mb": None,
                    "trainable_params": 7,
                }
            )
            + "\n"
            for name, times in printed
        )
        commands = []

        def fake_run(command, **kwargs):
            commands.append(command)
            return argparse.Namespace(returncode=0, stdout=stdout, stderr="")

        args = argparse.Namespace(
            rows=["keras_lora", "dora"],
            rounds=2,
            json=True,
            one_process=True,
            batch_size=1,
            sequence_length=8,
            warmup=1,
            steps=2,
        )
        original = speed.subprocess.run
        speed.subprocess.run = fake_run
        self.addCleanup(setattr, speed.subprocess, "run", original)
        rows = {row["name"]: row for row in speed.run_backend("torch", args)}
        self.assertEqual(len(commands), 1)
        self.assertIn("--one-process-rows", commands[0])
        self.assertEqual(
            commands[0][commands[0].index("--rounds") + 1], str(args.rounds)
        )
        # Medians of the pooled steps: (1.0, 1.2, 1.1, 0.9) and
        # (1.5, 1.4, 1.6, 1.3).
        self.assertAlmostEqual(rows["keras_lora"]["step_s"], 1.05)
        self.assertAlmostEqual(rows["dora"]["step_s"], 1.45)
        self.assertEqual(rows["dora"]["ratio_to_keras_lora"], 1.381)
        self.assertEqual(rows["dora"]["steps_timed"], 4)
        self.assertEqual(rows["dora"]["page_faults_per_step"], 5.0)
        self.assertIsNone(rows["dora"]["peak_mb"])
        table = speed._markdown(list(rows.values()), args)
        self.assertIn("all rows in one process", table)
        self.assertNotIn("None", table)

    def test_one_process_refuses_inference_rows(self):
        with self.assertRaisesRegex(ValueError, "base_inference"):
            speed.run_rows_in_turn(["dora", "base_inference"], 1, 1, 8, 1, 1)

    def test_one_process_times_real_rows_in_turn(self):
        if keras.config.backend() != "torch":
            self.skipTest(
                "one eager backend is enough to check the row building; "
                "JAX and TensorFlow would compile each row for a minute"
            )
        results = speed.run_rows_in_turn(
            ["keras_lora", "dora"],
            rounds=2,
            batch_size=1,
            sequence_length=8,
            warmup=1,
            steps=2,
        )
        self.assertEqual(
            [r["name"] for r in results],
            ["keras_lora", "dora", "dora", "keras_lora"],
        )
        for result in results:
            self.assertEqual(result["steps_timed"], 2)
            self.assertEqual(len(result["times"]), 2)
            self.assertEqual(len(result["faults"]), 2)
            self.assertTrue(all(t > 0 for t in result["times"]))
        # MiniLM-L6: query and value of 6 layers adapted at rank 8 (A, B
        # and a magnitude per output unit), and the 2-class head.
        hidden, rank = 384, 8
        adapters = 6 * 2 * (hidden * rank + rank * hidden + hidden)
        self.assertEqual(
            results[1]["trainable_params"], adapters + hidden * 2 + 2
        )
