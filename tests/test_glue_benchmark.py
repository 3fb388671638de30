"""Tests of `benchmarks/glue.py`: its plan, resumption and report.

The report's statistics are checked against NumPy on synthetic runs; a
real (tiny) study runs the script as documented, in a subprocess on the
outer run's backend, and its second invocation must recompute nothing.
"""

import contextlib
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest

from tests.test_case import TestCase
from tests.test_case import load_benchmark
from tests.test_case import save_tiny_bert_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "glue.py")


glue = load_benchmark("glue")


def _record(task, method, seed, value, changes=None, metric="accuracy"):
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "changes": changes or {},
        "dev": {metric: value},
        "main_metric": metric,
        "curve": [
            {"train_s": 1.0 + seed, "dev": {metric: value / 2}},
            {"train_s": 2.0 + seed, "dev": {metric: value}},
        ],
        "train_s": 2.0 + seed,
        "backend": "jax",
    }


def _plateau_record(study, task, arm, seed, value, rate, loss=1.0, **changes):
    """A synthetic run of a plateau study (`glue.ARMS`' `arm`)."""
    method, arm_changes = glue.ARMS[arm]
    metric = glue.FLOORS[task][0]
    changes = {**arm_changes, **changes, "learning_rate": rate}
    record = _record(task, method, seed, value, changes, metric)
    phase = "retrain" if method == "bidora" else "train"
    record.update(
        study=study,
        stopping_loss={phase: loss, "bilevel": -1.0}
        if method == "bidora"
        else {phase: loss},
        best_epochs={phase: 2},
        device="cpu",
    )
    return record


def _cells(table, row=2):
    """The stripped cells of a Markdown table's `row`."""
    line = table.splitlines()[row]
    return [cell.strip() for cell in line.strip("|").split("|")]


class PlateauStudiesTest(TestCase):
    """`--study pilot`, `floors` and `small-data` (issue 27)."""

    def _args(self, study, *options):
        return glue.parse_args(
            ["--out", self.get_temp_dir(), "--study", study, *options]
        )

    def _pilot_records(self, tasks=("rte", "mrpc", "sst2", "stsb")):
        """Pilot runs whose lowest held-out loss is at 2e-3 (lora and
        bidora-darts), 1e-3 (dora) and 5e-4 (bidora)."""
        best = {
            "lora": 2e-3,
            "dora": 1e-3,
            "bidora": 5e-4,
            "bidora-darts": 2e-3,
        }
        return [
            _plateau_record(
                "pilot",
                task,
                arm,
                glue.PILOT_SEED,
                0.5,
                rate,
                loss=0.3 if rate == best[arm] else 0.6,
                train_size=glue.PILOT_SIZE,
            )
            for task in tasks
            for arm in glue.ARMS
            for rate in glue.LEARNING_RATES
        ]

    def test_pilot_plan_covers_the_grid_and_darts_is_a_change(self):
        args = self._args("pilot", "--tasks", "rte", "cola")
        runs = glue.planned_runs(args)
        self.assertLen(runs, 2 * 4 * len(glue.LEARNING_RATES))
        self.assertEqual({r["seed"] for r in runs}, {glue.PILOT_SEED})
        self.assertEqual({r["study"] for r in runs}, {"pilot"})
        self.assertEqual(
            {r["changes"]["train_size"] for r in runs}, {glue.PILOT_SIZE}
        )
        darts = [r for r in runs if r["changes"].get("hypergradient")]
        self.assertLen(darts, 2 * len(glue.LEARNING_RATES))
        self.assertEqual(
            {(r["method"], r["changes"]["hypergradient"]) for r in darts},
            {("bidora", "darts")},
        )
        keys = [glue.run_key(r) for r in runs]
        self.assertLen(set(keys), len(keys))
        # A plateau run's key differs from an old run's of the same task,
        # method, seed and changes; an old run's key is as it was.
        old = glue._run("rte", "lora", 0)
        self.assertEqual(glue.run_key(old), '["rte", "lora", 0, {}]')
        self.assertNotEqual(glue.run_key(dict(old, study="floors")), old)
        from keras_bidora import recipes

        parameters = inspect.signature(recipes.finetune).parameters
        for run in runs[:8]:
            epochs = glue.epoch_budget(args, run, 1000, 1000)
            settings = glue.run_settings(args, run, *epochs, 1000)
            self.assertLessEqual(set(settings), set(parameters))
            self.assertEqual(settings["early_stopping_patience"], 3)
            self.assertEqual(
                settings["early_stopping_min_steps"], glue.MIN_STEPS
            )
            self.assertEqual(settings["batch_size"], glue.SMALL_BATCH_SIZE)
            self.assertEqual(
                settings["learning_rate"], run["changes"]["learning_rate"]
            )
            expected = run["changes"].get("hypergradient", "first_order")
            self.assertEqual(settings["hypergradient"], expected)
            bidora = run["method"] == "bidora"
            retrain = glue.MAX_RETRAIN_EPOCHS if bidora else 0
            self.assertEqual(epochs, (glue.MAX_EPOCHS, retrain))
        # 100 examples: 10 held out for early stopping, 90 fitted in 12
        # batches of 8; BiDoRA's bi-level phase fits 72 (18 upper) in 9.
        # The first phase's maximum leaves room for 300 steps and 3
        # epochs of patience after them; at 1000 examples 20 do.
        for method, phases in (("lora", (12,)), ("bidora", (9, 12))):
            run = {"study": "pilot", "method": method, "changes": {}}
            maxima = glue.epoch_budget(args, run, 100, 100)
            for epochs, steps in zip(maxima, phases):
                self.assertGreaterEqual(epochs * steps, 300 + 3 * steps)
                self.assertLess((epochs - 1) * steps, 300 + 3 * steps)
        # Above SMALL_BATCH_LIMIT examples, the library's batch size.
        larger = glue.run_settings(args, runs[0], 20, 0, 1001)
        self.assertEqual(larger["batch_size"], glue.config.BATCH_SIZE)

    def test_arms_choose_the_methods_of_the_plateau_studies(self):
        arms = ("lora", "bidora")
        for study in ("pilot", "small-data"):
            args = self._args(study, "--arms", *arms, "--tasks", "stsb")
            runs = glue.planned_runs(args, self._pilot_records())
            self.assertEqual({glue.arm_of(r) for r in runs}, set(arms))
            per_arm = len(args.learning_rates) if study == "pilot" else 15
            self.assertLen(runs, len(arms) * per_arm)

    def test_small_data_plan_shares_subsets_across_methods(self):
        args = self._args("small-data")
        runs = glue.planned_runs(args, self._pilot_records())
        self.assertEqual(args.tasks, ("rte", "mrpc", "sst2", "stsb"))
        self.assertEqual(tuple(args.seeds), (0, 1, 2, 3, 4))
        self.assertLen(runs, 4 * 3 * 4 * 5)
        self.assertEqual([r["seed"] for r in runs[:48]], [0] * 48)
        keys = [glue.run_key(r) for r in runs]
        self.assertLen(set(keys), len(keys))
        rates = {
            (r["method"], r["changes"].get("hypergradient")): r["changes"][
                "learning_rate"
            ]
            for r in runs
        }
        self.assertEqual(
            rates,
            {
                ("lora", None): 2e-3,
                ("dora", None): 1e-3,
                ("bidora", None): 5e-4,
                ("bidora", "darts"): 2e-3,
            },
        )
        subsets = {}
        for run in runs:
            size = run["changes"]["train_size"]
            indices, _ = glue.train_indices(run, 5000)
            self.assertLen(indices, size)
            key = (run["task"], size, run["seed"])
            subsets.setdefault(key, []).append(indices)
        for same in subsets.values():
            self.assertLen(same, 4)
            for indices in same[1:]:
                np.testing.assert_array_equal(indices, same[0])
        self.assertFalse(
            np.array_equal(subsets["rte", 100, 0][0], subsets["rte", 100, 1][0])
        )
        # Another pooling is a variant, whose pilot is another one.
        mean = self._args("small-data", "--pooling", "mean")
        with pytest.raises(ValueError, match="--study pilot --tasks rte"):
            glue.planned_runs(mean, self._pilot_records())
        mean = self._args(
            "small-data",
            "--pooling",
            "mean",
            "--learning-rate-of",
            *(f"{arm}=1e-3" for arm in glue.ARMS),
        )
        runs = glue.planned_runs(mean, [])
        self.assertEqual({r["changes"]["pooling"] for r in runs}, {"mean"})
        self.assertEqual(glue.by_variant(runs[:1])[1], ["rte, mean pooling"])
        self.assertNotIn("pooling", glue.variant(args, "rte"))
        for bad in ("darts=1e-3", "lora=0", "lora=x"):
            with pytest.raises(SystemExit):
                glue.parse_args(["--learning-rate-of", bad])

    def test_floors_plan_is_lora_on_the_full_set(self):
        args = self._args("floors", "--tasks", "rte", "sst2")
        with pytest.raises(ValueError, match="--learning-rate-of lora=LR"):
            glue.planned_runs(args, [])
        runs = glue.planned_runs(args, self._pilot_records())
        self.assertLen(runs, 2 * 3)
        self.assertEqual({r["method"] for r in runs}, {"lora"})
        self.assertEqual(
            [r["changes"] for r in runs], [{"learning_rate": 2e-3}] * 6
        )
        self.assertIsNone(glue.train_indices(runs[0], 900)[0])
        # The plateau studies read all of SST-2, the others 1,000.
        self.assertIsNone(glue.train_limit(args, "sst2"))
        self.assertEqual(glue.train_limit(self._args("main"), "sst2"), 1000)

    def test_learning_rate_is_the_lowest_held_out_loss(self):
        rng = np.random.default_rng(3)
        rates = (5e-4, 1e-3, 2e-3, 5e-3)
        records, losses = [], {}
        for task in ("rte", "stsb"):
            for arm in glue.ARMS:
                for rate in rates:
                    loss = float(rng.uniform(0.1, 1.0))
                    if rate == 5e-3 and arm == "dora":
                        loss = float("nan")  # a diverged run
                    losses[task, arm, rate] = loss
                    # A high dev metric must not sway the choice.
                    records.append(
                        _plateau_record(
                            "pilot", task, arm, 100, loss, rate, loss=loss
                        )
                    )
        chosen = glue.chosen_learning_rates(records)
        for task in ("rte", "stsb"):
            for arm in glue.ARMS:
                finite = [
                    (losses[task, arm, rate], rate)
                    for rate in rates
                    if not np.isnan(losses[task, arm, rate])
                ]
                self.assertEqual(
                    chosen[task, arm, ()], min(finite)[1], (task, arm)
                )
        table = glue.pilot_table(records)
        marked = [line for line in table.splitlines() if "**chosen**" in line]
        self.assertLen(marked, 2 * 4)
        self.assertLen(table.splitlines(), 2 + 2 * 4 * 4)

    def test_small_data_table_matches_scipy(self):
        from scipy import stats

        rng = np.random.default_rng(0)
        seeds = 5
        values = {arm: rng.uniform(0.5, 0.9, seeds) for arm in glue.ARMS}
        records = [
            dict(
                _plateau_record(
                    "small-data",
                    "mrpc",
                    arm,
                    seed,
                    float(values[arm][seed]),
                    1e-3,
                    train_size=100,
                ),
                train_s=float(10 + seed),
            )
            for arm in glue.ARMS
            for seed in range(seeds)
        ]
        records.append(
            _plateau_record("small-data", "mrpc", "lora", 0, 0.6, 1e-3)
        )
        cells = _cells(glue.small_data_table(records))
        self.assertEqual(cells[:2], ["mrpc (accuracy)", "100"])
        for arm, cell in zip(glue.ARMS, cells[2:6]):
            self.assertEqual(
                cell,
                f"{100 * values[arm].mean():.1f} ± "
                f"{100 * values[arm].std(ddof=1):.1f}",
            )
        t = stats.t.ppf(0.975, seeds - 1)
        for (first, second), cell in zip(glue.DIFFERENCES, cells[6:9]):
            difference = 100 * (values[first] - values[second])
            mean = difference.mean()
            half = t * difference.std(ddof=1) / np.sqrt(seeds)
            self.assertEqual(
                cell,
                f"{mean:.1f} [{mean - half:.1f}, {mean + half:.1f}] (5)",
            )
        self.assertEqual(cells[9], "12 / 12 / 12 / 12")
        self.assertEqual(cells[10], "0.001 / 0.001 / 0.001 / 0.001")
        self.assertEqual(cells[11], "5 / 5 / 5 / 5")
        for degrees, quantile in glue.T_QUANTILES.items():
            self.assertAlmostEqual(
                quantile, stats.t.ppf(0.975, degrees), places=3
            )

    def test_floors_table_passes_and_drops(self):
        records = [
            _plateau_record("floors", "rte", "lora", s, v, 2e-3)
            for s, v in enumerate((0.62, 0.60, 0.61))
        ] + [
            _plateau_record("floors", "stsb", "lora", s, v, 1e-3)
            for s, v in enumerate((0.81, 0.78))
        ]
        results = glue.floor_results(records)
        self.assertEqual(
            {task: r[-1] for task, r in results.items()},
            {"rte": True, "stsb": False},
        )
        table = glue.floors_table(records)
        rte, stsb = _cells(table, 2), _cells(table, 3)
        self.assertEqual(
            rte[:7],
            ["rte", "accuracy", "60", "61.0 ± 1.0", "3", "0.002", "pass"],
        )
        self.assertEqual(stsb[1:3], ["pearson", "80"])
        self.assertEqual(stsb[6], "fail (dropped: floor not reached)")

    def test_report_keeps_the_studies_apart(self):
        args = self._args("small-data", "--report")
        path = os.path.join(args.out, "runs.jsonl")
        old = [_record("rte", m, 0, 0.5) for m in glue.COMPARED_METHODS]
        new = self._pilot_records(("rte",))
        new += [
            _plateau_record(
                "small-data", "rte", arm, seed, 0.6, 1e-3, train_size=size
            )
            for arm in glue.ARMS
            for seed in (0, 1)
            for size in (8, 16)
        ]
        for record in old + new:
            glue.append_run(path, record)
        glue.write_report(args)
        for name in ("glue.md", "pilot.md", "small_data.md", "small_data.png"):
            self.assertTrue(os.path.exists(os.path.join(args.out, name)))
        self.assertFalse(os.path.exists(os.path.join(args.out, "floors.md")))
        with open(os.path.join(args.out, "glue.md")) as file:
            self.assertTrue(file.read().startswith("3 runs,"))


class GlueBenchmarkTest(TestCase):
    def _sensitivity_args(self, task, *options):
        """`glue.py --study sensitivity` on one task, with `options`."""
        return glue.parse_args(
            [
                "--out",
                self.get_temp_dir(),
                "--study",
                "sensitivity",
                "--sensitivity-tasks",
                task,
                *options,
            ]
        )

    def test_plan_is_seed_major_and_complete(self):
        args = glue.parse_args(["--out", self.get_temp_dir()])
        runs = glue.planned_runs(args)
        main = [r for r in runs if not r["changes"]]
        # 5 tasks x 3 methods x 3 seeds, then per seed and sensitivity
        # task: 2 upper fractions, 2 regularizations, first_order,
        # upper_every=4, and 2 sizes x 3 methods.
        self.assertLen(main, 45)
        self.assertLen(runs, 45 + 3 * 2 * (2 + 2 + 1 + 1 + 2 * 3))
        self.assertEqual([r["seed"] for r in main[:15]], [0] * 15)
        keys = [glue.run_key(r) for r in runs]
        self.assertLen(set(keys), len(keys))

    def test_vary_picks_and_orders_the_sensitivity_settings(self):
        args = self._sensitivity_args(
            "sst2", "--seeds", "4", "--vary", "upper_every", "hypergradient"
        )
        runs = glue.planned_runs(args)
        self.assertEqual(
            [(r["task"], r["method"], r["seed"], r["changes"]) for r in runs],
            [
                ("sst2", "bidora", 4, {"upper_every": 4}),
                ("sst2", "bidora", 4, {"hypergradient": "first_order"}),
            ],
        )
        settings = glue.run_settings(args, runs[0], 2, 1, 1000)
        self.assertEqual(settings["upper_every"], 4)
        # The other settings are the main study's, whatever the library's
        # defaults (darts, not its default first_order).
        self.assertEqual(settings["hypergradient"], "darts")
        self.assertEqual(settings["upper_fraction"], 0.2)
        self.assertEqual(settings["direction_regularization"], 1e-5)
        self.assertEqual(
            (settings["epochs"], settings["retrain_epochs"]), (2, 1)
        )
        # Every setting is an argument of the recipe.
        from keras_bidora import recipes

        parameters = inspect.signature(recipes.finetune).parameters
        self.assertLessEqual(set(settings), set(parameters))
        # --setting adds (or overrides) recipe arguments, numbers parsed.
        args = self._sensitivity_args(
            "sst2",
            "--setting",
            "learning_rate=2e-3",
            "--setting",
            "retrain_init=reinitialize",
        )
        settings = glue.run_settings(args, runs[0], 2, 1, 1000)
        self.assertEqual(settings["learning_rate"], 2e-3)
        self.assertEqual(settings["retrain_init"], "reinitialize")
        with pytest.raises(SystemExit):
            glue.parse_args(["--setting", "learning_rate"])

    def test_train_sizes_pick_the_subsets_and_their_table_rows(self):
        args = self._sensitivity_args(
            "rte",
            "--seeds",
            "0",
            "--vary",
            "train_size",
            "--train-sizes",
            "300",
        )
        runs = glue.planned_runs(args)
        self.assertEqual(
            [(r["method"], r["changes"]) for r in runs],
            [(m, {"train_size": 300}) for m in glue.COMPARED_METHODS],
        )
        records = [
            _record("rte", m, 0, 0.5 + 0.1 * i, {"train_size": 300})
            for i, m in enumerate(glue.COMPARED_METHODS)
        ] + [
            dict(_record("rte", m, 0, 0.6), train_examples=2490)
            for m in glue.COMPARED_METHODS
        ]
        rows = glue.sensitivity_table(records, ["rte"]).splitlines()[2:]
        self.assertEqual(
            [row.split("|")[2].strip() for row in rows],
            ["train_size=300", "train_size=all (2490)"],
        )
        cells = [c.strip() for c in rows[0].strip("|").split("|")]
        self.assertEqual(cells[2:5], ["50.0", "60.0", "70.0"])
        with pytest.raises(SystemExit):
            glue.parse_args(["--train-sizes", "0"])

    def test_examples_budget_scales_the_epochs_of_a_subset(self):
        args = self._sensitivity_args(
            "sst2",
            "--seeds",
            "0",
            "--vary",
            "train_size",
            "--train-sizes",
            "200",
            "--train-size-budget",
            "examples",
        )
        runs = glue.planned_runs(args)
        changes = {"train_size": 200, "budget": "examples"}
        self.assertEqual([r["changes"] for r in runs], [changes] * 3)
        # 3 epochs of 1,000 examples are as many examples as 15 of 200.
        self.assertEqual(
            [glue.epoch_budget(args, r, 200, 1000) for r in runs],
            [(15, 0), (15, 0), (14, 1)],
        )
        plain = glue._run("sst2", "bidora", 0, train_size=200)
        self.assertEqual(glue.epoch_budget(args, plain, 200, 1000), (2, 1))
        records = []
        for run, value in zip(runs, (0.5, 0.6, 0.7)):
            epochs, retrain = glue.epoch_budget(args, run, 200, 1000)
            record = _record("sst2", run["method"], 0, value, run["changes"])
            record["settings"] = glue.run_settings(
                args, run, epochs, retrain, 200
            )
            records.append(record)
        # Runs made before the recipe moved into the library kept their
        # command line instead; both count their epochs alike.
        old_style = dict(records[0])
        del old_style["settings"]
        old_style["train_argv"] = ["--epochs", "15", "--retrain-epochs", "0"]
        self.assertEqual(glue._epochs(old_style), glue._epochs(records[0]))
        records += [
            dict(_record("sst2", m, 0, 0.8), train_examples=1000)
            for m in glue.COMPARED_METHODS
        ]
        rows = glue.sensitivity_table(records, ["sst2"]).splitlines()[2:]
        self.assertEqual(
            [row.split("|")[2].strip() for row in rows],
            ["train_size=200, 15 epochs", "train_size=all (1000)"],
        )
        cells = [c.strip() for c in rows[0].strip("|").split("|")]
        self.assertEqual(cells[2:6], ["50.0", "60.0", "70.0", "10.0 (1)"])

    def test_train_sample_and_sequence_length_mark_every_run(self):
        args = glue.parse_args(
            [
                "--out",
                self.get_temp_dir(),
                "--tasks",
                "cola",
                "rte",
                "--sensitivity-tasks",
                "cola",
                "--vary",
                "upper_fraction",
                "train_size",
                "--train-sizes",
                "40",
                "--train-sample",
                "cola=100",
                "--sequence-length",
                "cola=32",
                "rte=128",  # rte's default: no change to record
            ]
        )
        runs = glue.planned_runs(args)
        variant = {"train_sample": 100, "sequence_length": 32}
        for run in runs:
            expected = variant if run["task"] == "cola" else {}
            self.assertEqual(
                {k: run["changes"][k] for k in variant if k in run["changes"]},
                expected,
            )
        self.assertIn(
            {**variant, "upper_fraction": 0.1},
            [r["changes"] for r in runs if r["method"] == "bidora"],
        )
        for bad in ("cola", "cola=0", "cola=x", "qnli=10"):
            with pytest.raises(SystemExit):
                glue.parse_args(["--train-sample", bad])

    def test_train_indices_sample_once_and_subsets_per_seed(self):
        total = 500
        main = [
            glue.train_indices(glue._run("cola", m, s, train_sample=100), total)
            for m in glue.COMPARED_METHODS
            for s in (0, 1)
        ]
        pool, full = main[0]
        self.assertEqual(full, 100)
        self.assertLen(np.unique(pool), 100)
        self.assertTrue(np.all(np.diff(pool) > 0))
        self.assertLess(pool.max(), total)
        self.assertGreater(pool.max(), 100)  # a sample, not the first 100
        for indices, _ in main[1:]:
            np.testing.assert_array_equal(indices, pool)
        subsets = []
        for seed in (0, 1):
            run = glue._run(
                "cola", "dora", seed, train_sample=100, train_size=30
            )
            indices, full = glue.train_indices(run, total)
            self.assertEqual(full, 100)  # the examples budget's reference
            self.assertLen(np.unique(indices), 30)
            self.assertTrue(set(indices) <= set(pool))
            subsets.append(indices)
        self.assertFalse(np.array_equal(*subsets))
        # Without a sample, a subset is the one the committed runs used.
        run = glue._run("sst2", "lora", 2, train_size=200)
        indices, full = glue.train_indices(run, 1000)
        expected = np.random.default_rng(1002).permutation(1000)[:200]
        np.testing.assert_array_equal(indices, np.sort(expected))
        self.assertEqual(full, 1000)
        self.assertIsNone(glue.train_indices(glue._run("rte", "lora", 0), 9)[0])
        with pytest.raises(ValueError, match="cola=500 is not smaller"):
            glue.train_indices(
                glue._run("cola", "lora", 0, train_sample=500), 500
            )

    def test_cached_tokens_at_another_length_are_kept_apart(self):
        out = self.get_temp_dir()
        args = glue.parse_args(
            [
                "--out",
                out,
                "--data-dir",
                out,  # no data files: only the cache is read
                "--sequence-length",
                "cola=32",
            ]
        )
        arrays = {"train_labels": np.arange(3), "dev_labels": np.arange(2)}
        os.makedirs(args.tokens)
        for name, length in (("cola", 64), ("cola-32", 32)):
            np.savez(os.path.join(args.tokens, f"{name}.npz"), **arrays)
            meta = {"sequence_length": length, "files": None}
            with open(os.path.join(args.tokens, f"{name}.json"), "w") as f:
                json.dump(meta, f)
        _, meta = glue.tokens(args, "cola", None)
        self.assertEqual(meta["sequence_length"], 32)
        plain = glue.parse_args(["--out", out, "--data-dir", out])
        self.assertEqual(
            glue.tokens(plain, "cola", None)[1]["sequence_length"], 64
        )
        with open(os.path.join(args.tokens, "cola-32.json"), "w") as f:
            json.dump({"sequence_length": 64, "files": None}, f)
        with pytest.raises(ValueError, match="sequence length 64, not 32"):
            glue.tokens(args, "cola", None)

    def test_a_variant_is_a_task_of_its_own_in_the_tables(self):
        sample = {"train_sample": 1000}
        records = [
            _record("cola", m, 0, 0.4, metric="mcc")
            for m in glue.COMPARED_METHODS
        ]
        records += [
            _record("cola", m, s, 0.1 * (i + 1) + 0.01 * s, sample, "mcc")
            for i, m in enumerate(glue.COMPARED_METHODS)
            for s in (0, 1)
        ]
        varied = {**sample, "upper_fraction": 0.1}
        records.append(_record("cola", "bidora", 0, 0.9, varied, "mcc"))
        relabeled, tasks = glue.by_variant(records)
        self.assertEqual(tasks, ["cola", "cola, 1000 sampled"])
        self.assertEqual(records[3]["changes"], sample)  # not modified
        rows = glue.main_table(relabeled, tasks).splitlines()[2:]
        cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
        self.assertEqual(cells[0][:4], ["cola (mcc)", "40.0", "40.0", "40.0"])
        self.assertEqual(
            cells[1][:5],
            [
                "cola, 1000 sampled (mcc)",
                "10.5 ± 0.7",
                "20.5 ± 0.7",
                "30.5 ± 0.7",
                "10.0 ± 0.0 (2)",
            ],
        )
        table = glue.sensitivity_table(relabeled, tasks)
        row = next(r for r in table.splitlines() if "upper_fraction=0.1" in r)
        # Against the sample's DoRA runs (20 and 21), not the full set's.
        self.assertIn("| cola, 1000 sampled (mcc) |", row)
        self.assertIn("| 90.0 | 70.0 (1) |", row)
        label = glue.by_variant(
            [_record("stsb", "lora", 0, 0.5, {**sample, "sequence_length": 64})]
        )[1]
        self.assertEqual(label, ["stsb, 1000 sampled, 64 tokens"])

    def test_a_mean_that_rounds_to_zero_has_no_sign(self):
        self.assertEqual(glue._fmt((-0.0004, 0.012)), "0.0 ± 1.2")
        self.assertEqual(glue._fmt((-0.0006, float("nan"))), "-0.1")

    def test_resumes_from_runs_on_disk_after_a_cut_line(self):
        path = os.path.join(self.get_temp_dir(), "runs.jsonl")
        first = _record("rte", "lora", 0, 0.5)
        glue.append_run(path, first)
        with open(path, "a") as file:
            file.write('{"task": "rte", "meth')  # a run killed mid-write
        second = _record("rte", "dora", 0, 0.6)
        glue.append_run(path, second)
        runs = glue.read_runs(path)
        self.assertEqual(
            sorted(runs), sorted(glue.run_key(r) for r in (first, second))
        )
        self.assertEqual(runs[glue.run_key(second)]["dev"]["accuracy"], 0.6)

    def test_table_matches_numpy(self):
        rng = np.random.default_rng(0)
        values = {m: rng.uniform(0.5, 0.9, 3) for m in glue.COMPARED_METHODS}
        records = [
            _record("mrpc", method, seed, float(values[method][seed]))
            for method in glue.COMPARED_METHODS
            for seed in range(3)
        ]
        line = glue.main_table(records, ["mrpc"]).splitlines()[2]
        cells = [c.strip() for c in line.strip("|").split("|")]
        for method, cell in zip(glue.COMPARED_METHODS, cells[1:4]):
            expected = values[method]
            self.assertEqual(
                cell,
                f"{100 * expected.mean():.1f} ± "
                f"{100 * expected.std(ddof=1):.1f}",
            )
        difference = values["bidora"] - values["dora"]
        self.assertEqual(
            cells[4],
            f"{100 * difference.mean():.1f} ± "
            f"{100 * difference.std(ddof=1):.1f} (3)",
        )
        self.assertEqual(cells[5], "3 / 3 / 3")
        self.assertEqual(cells[6], "2 / 2 / 2")  # the fastest of 2, 3, 4 s

    def test_paired_difference_uses_common_seeds_only(self):
        records = [
            _record("rte", "dora", 0, 0.50),
            _record("rte", "dora", 1, 0.60),
            _record("rte", "bidora", 1, 0.65),
            _record("rte", "bidora", 2, 0.90),
        ]
        line = glue.main_table(records, ["rte"]).splitlines()[2]
        cells = [c.strip() for c in line.strip("|").split("|")]
        self.assertEqual(cells[4], "5.0 (1)")  # seed 1 only, no spread
        self.assertEqual(cells[5], "0 / 2 / 2")

    def test_sensitivity_rows_compare_with_the_default_runs(self):
        records = [_record("rte", m, 0, 0.5) for m in glue.COMPARED_METHODS]
        records.append(
            _record("rte", "bidora", 0, 0.7, {"upper_fraction": 0.1})
        )
        table = glue.sensitivity_table(records, ["rte", "sst2"])
        rows = {
            line.split("|")[2].strip(): line for line in table.splitlines()[2:]
        }
        self.assertIn("70.0", rows["upper_fraction=0.1"])
        self.assertIn("20.0 (1)", rows["upper_fraction=0.1"])
        self.assertIn("50.0", rows["upper_fraction=0.2"])
        self.assertNotIn("upper_fraction=0.3", rows)
        self.assertNotIn("sst2", table)

    def test_cached_encoder_decodes_like_the_task(self):
        from keras_bidora.data import get_task_spec

        outputs = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 0.5]])
        encoder = glue.CachedEncoder(get_task_spec("rte"), 128)
        np.testing.assert_array_equal(
            encoder.decode(outputs, None), np.argmax(outputs, axis=-1)
        )
        encoder = glue.CachedEncoder(get_task_spec("stsb"), 128)
        np.testing.assert_allclose(
            encoder.decode(outputs[:, :1], None), outputs[:, 0]
        )

    def test_limit_is_refused_for_the_committed_results(self):
        with pytest.raises(SystemExit):
            glue.parse_args(["--limit", "10"])

    def test_bad_counts_are_refused_before_any_run(self):
        for flag, value in (
            ("--min-steps", "-1"),
            ("--patience", "0"),
            ("--max-epochs", "0"),
            ("--max-retrain-epochs", "2.5"),
            ("--small-sizes", "-100"),
            ("--pilot-size", "many"),
        ):
            with self.subTest(flag=flag):
                stderr = io.StringIO()
                with contextlib.redirect_stderr(stderr):
                    with pytest.raises(SystemExit):
                        glue.parse_args(["--study", "pilot", flag, value])
                self.assertIn(flag, stderr.getvalue())
                self.assertIn(repr(value), stderr.getvalue())
        args = glue.parse_args(["--study", "pilot", "--min-steps", "0"])
        self.assertEqual(args.min_steps, 0)


@pytest.mark.large
class GlueStudyRunTest(TestCase):
    # The runs check the script's pipeline and bookkeeping on real text, not
    # accuracy: a 1-layer random BERT with the default tokenizer does.
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.preset = save_tiny_bert_preset(tempfile.mkdtemp())

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.preset, ignore_errors=True)
        super().tearDownClass()

    def _command(self, out, *options):
        """The script's command line on this backend, writing to `out`."""
        return [
            sys.executable,
            SCRIPT,
            "--backend",
            keras.config.backend(),
            "--preset",
            self.preset,
            "--out",
            out,
            *options,
        ]

    def test_tiny_study_runs_and_resumes(self):
        out = self.get_temp_dir()
        command = self._command(
            out,
            "--tasks",
            "sst2",
            "--study",
            "main",
            "--seeds",
            "0",
            "--epochs",
            "2",
            "--limit",
            "24",
        )
        environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        first = subprocess.run(
            command, capture_output=True, text=True, env=environment
        )
        self.assertEqual(first.returncode, 0, first.stderr[-3000:])
        with open(os.path.join(out, "runs.jsonl")) as file:
            records = [json.loads(line) for line in file]
        self.assertEqual(
            sorted(r["method"] for r in records), sorted(glue.COMPARED_METHODS)
        )
        for record in records:
            self.assertEqual(record["train_examples"], 24)
            self.assertEqual(record["backend"], keras.config.backend())
            self.assertLen(record["curve"], 2)  # BiDoRA: 1 + 1 retrain
            times = [point["train_s"] for point in record["curve"]]
            self.assertLess(0, times[0])
            self.assertLess(times[0], times[1])
            accuracy = record["dev"]["accuracy"]
            # 24 dev examples: the accuracy is a count over 24.
            self.assertAlmostEqual(accuracy * 24, round(accuracy * 24))
        steps = {r["method"]: r["steps"] for r in records}
        # batch 32 > 24 examples: one step per epoch; BiDoRA's bi-level
        # epoch steps over its lower split, then one retrain epoch.
        self.assertEqual(steps["lora"], {"train": 2})
        self.assertEqual(steps["bidora"], {"bilevel": 1, "retrain": 1})
        with open(os.path.join(out, "glue.md")) as file:
            self.assertIn("| sst2 (accuracy) |", file.read())
        second = subprocess.run(
            command, capture_output=True, text=True, env=environment
        )
        self.assertEqual(second.returncode, 0, second.stderr[-3000:])
        self.assertIn("3 runs on disk, 0 to run", second.stdout)

    @pytest.mark.skipif(
        keras.config.backend() != "jax",
        reason="8 tiny runs take about 2 minutes; the studies run on JAX "
        "(their --backend default), so CI runs this once, under JAX",
    )
    def test_tiny_plateau_studies_run_and_resume(self):
        out = self.get_temp_dir()
        common = self._command(
            out,
            "--tasks",
            "sst2",
            "--limit",
            "24",
            "--max-epochs",
            "2",
            "--max-retrain-epochs",
            "1",
            "--patience",
            "1",
            # 8 examples make one step an epoch: the first phase needs 4
            # epochs for the minimum, more than --max-epochs.
            "--min-steps",
            "4",
            # One arm of each level; test_arms_choose_the_methods_of_the_
            # plateau_studies checks the plans of the others.
            "--arms",
            "lora",
            "bidora",
            # JAX: the runs of a shape after the first skip compiling.
            "--jax-compilation-cache",
            os.path.join(out, "jax-cache"),
        )
        pilot = common + [
            "--study",
            "pilot",
            "--learning-rates",
            "1e-3",
            "5e-3",
        ]
        small = [
            *common,
            "--study",
            "small-data",
            # One size (whose runs need more epochs than --max-epochs for
            # the step minimum) keeps this test's 8 runs within minutes.
            "--small-sizes",
            "8",
            "--seeds",
            "0",
            "1",
        ]
        environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        for command in (pilot, small):
            done = subprocess.run(
                command, capture_output=True, text=True, env=environment
            )
            self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        records = list(glue.read_runs(os.path.join(out, "runs.jsonl")).values())
        self.assertLen(records, 2 * 2 + 1 * 2 * 2)
        chosen = glue.chosen_learning_rates(records)
        for record in records:
            self.assertIn(record["study"], ("pilot", "small-data"))
            self.assertEqual(record["pooling"], "cls")
            phases = {"bidora": {"bilevel", "retrain"}}.get(
                record["method"], {"train"}
            )
            self.assertEqual(set(record["stopping_loss"]), phases)
            self.assertEqual(
                record["settings"]["batch_size"], glue.SMALL_BATCH_SIZE
            )
            self.assertEqual(record["settings"]["early_stopping_min_steps"], 4)
            for phase, steps in record["steps"].items():
                # No phase ends before the minimum, whatever --max-epochs.
                self.assertGreaterEqual(steps, 4, (record["changes"], phase))
            for phase, epoch in record["best_epochs"].items():
                losses = record["history"][phase]["val_loss"]
                self.assertEqual(losses[epoch - 1], min(losses))
            if record["study"] == "small-data":
                arm = glue.arm_of(record)
                self.assertEqual(
                    record["learning_rate"], chosen["sst2", arm, ()]
                )
                size = record["changes"]["train_size"]
                self.assertEqual(record["train_examples"], size)
        for name in ("pilot.md", "small_data.md", "small_data.png"):
            self.assertTrue(os.path.exists(os.path.join(out, name)), name)
        with open(os.path.join(out, "small_data.md")) as file:
            self.assertIn("| sst2 (accuracy) | 8 |", file.read())
        again = subprocess.run(
            small, capture_output=True, text=True, env=environment
        )
        self.assertEqual(again.returncode, 0, again.stderr[-3000:])
        self.assertIn("8 runs on disk, 0 to run", again.stdout)
