"""Tests of `keras_bidora.recipes`: `finetune` for each method on a tiny
random BERT, against references computed here (NumPy column norms,
parameter counts from shapes, `keras.Model.predict` of the trained model).
"""

import os

import keras
import keras_hub
import numpy as np

from keras_bidora import BiDoRAModel
from keras_bidora import config
from keras_bidora import recipes
from keras_bidora.data import get_task_spec
from keras_bidora.data import load_task
from keras_bidora.data import resolve_preset
from tests.test_case import TestCase
from tests.test_case import to_numpy

SEQUENCE = 8
HIDDEN = 16
RANK = 2
# The head of a BertTextClassifier: Dense(HIDDEN -> 2 classes).
HEAD = HIDDEN * 2 + 2


def build_task():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=100,
        num_layers=2,
        num_heads=2,
        hidden_dim=HIDDEN,
        intermediate_dim=32,
        max_sequence_length=16,
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None
    )


def make_data(size, seed):
    """Token ids whose first token decides the class: learnable."""
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(1, 100, (size, SEQUENCE))
    x = {
        "token_ids": token_ids,
        "segment_ids": np.zeros((size, SEQUENCE), "int32"),
        "padding_mask": np.ones((size, SEQUENCE), "bool"),
    }
    return x, (token_ids[:, 0] < 50).astype("int32")


TRAIN = make_data(64, seed=1)
DEV = make_data(16, seed=2)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def finetune(model, method, train=TRAIN, **kwargs):
    settings = dict(
        rank=RANK,
        epochs=1,
        batch_size=16,
        learning_rate=1e-2,
        loss=LOSS,
        validation=False,
        verbose=0,
        log=None,
    )
    settings.update(kwargs)
    return recipes.finetune(model, train, DEV, method, **settings)


class MagnitudeLog(keras.callbacks.Callback):
    """The magnitudes at the end of each phase's `fit`."""

    def __init__(self):
        super().__init__()
        self.phases = []

    def on_train_end(self, logs=None):
        self.phases.append([to_numpy(m) for m in self.model.magnitudes])


class FinetuneTest(TestCase):
    def assert_merged_matches_trained(self, result):
        trained = keras.Model.predict(result.model, DEV[0], verbose=0)
        merged = keras.Model.predict(result.merged, DEV[0], verbose=0)
        self.assertAllClose(merged, trained, atol=1e-4)
        self.assertAllClose(result.dev_outputs, merged, atol=1e-6)
        self.assertLess(result.merge_max_abs_difference, 1e-4)

    def test_lora(self):
        def accuracy(outputs):
            return {"accuracy": float(np.mean(outputs.argmax(-1) == DEV[1]))}

        result = finetune(build_task, "lora", epochs=3, score=accuracy)
        self.assertEqual(result.method, "lora")
        self.assertIsInstance(result.model, keras_hub.models.BertTextClassifier)
        names = [v.path.rsplit("/", 1)[-1] for v in result.model.weights]
        self.assertNotIn("magnitude", names)
        # Query and value of 2 blocks, each a (16, 2, 8) kernel: 16 in, 16
        # out.
        direction = 2 * 2 * RANK * (HIDDEN + HIDDEN)
        self.assertEqual(
            result.parameters,
            {
                "trainable": direction + HEAD,
                "magnitude": 0,
                "direction": direction,
                "head_and_other": HEAD,
                "total": result.parameters["total"],
            },
        )
        self.assert_merged_matches_trained(result)
        self.assertEqual(result.dev_metrics, accuracy(result.dev_outputs))
        losses = result.history["train"]["loss"]
        self.assertLen(losses, 3)
        self.assertLess(losses[-1], losses[0])
        self.assertEqual(result.steps, {"train": 3 * 4})
        self.assertLen(result.batch_loss["train"], 3 * 4)
        self.assertEqual(
            list(result.to_dict()),
            [
                "method",
                "dev",
                "wall_time_s",
                "steps",
                "best_epochs",
                "stopping_loss",
                "epochs",
                "batch_loss",
                "parameters",
                "merge_max_abs_difference",
            ],
        )
        path = os.path.join(self.get_temp_dir(), result.adapter_file_name)
        result.save_adapter(path)
        self.assertEqual(os.path.basename(path), "adapter.npz")
        self.assertTrue(os.path.exists(path))

    def test_keras_lora(self):
        result = finetune(build_task, "keras-lora")
        self.assertEqual(result.parameters["magnitude"], 0)
        self.assertGreater(result.parameters["direction"], 0)
        self.assert_merged_matches_trained(result)
        for layer in result.merged._flatten_layers():
            self.assertFalse(getattr(layer, "lora_enabled", False))
        self.assertEqual(result.adapter_file_name, "adapter.lora.h5")
        path = os.path.join(self.get_temp_dir(), result.adapter_file_name)
        result.save_adapter(path)
        self.assertTrue(os.path.exists(path))

    def test_dora_without_merge_and_with_sample_weights(self):
        x, y = TRAIN
        result = recipes.finetune(
            build_task,
            (x, y, np.ones(len(y), "float32")),
            DEV,
            "dora",
            rank=RANK,
            epochs=1,
            batch_size=16,
            loss=LOSS,
            merge=False,
            verbose=0,
            log=None,
        )
        self.assertIsInstance(result.model, BiDoRAModel)
        self.assertIsNone(result.merged)
        self.assertIsNone(result.merge_max_abs_difference)
        self.assertNotIn("merge_max_abs_difference", result.to_dict())
        self.assertIsNone(result.dev_metrics)
        # dora trains m and the direction jointly on all the data.
        self.assertEqual(result.steps, {"train": 4})
        self.assertEqual(result.parameters["magnitude"], 2 * 2 * HIDDEN)
        self.assertIn("val_loss", result.history["train"])
        self.assertAllClose(
            result.dev_outputs,
            keras.Model.predict(result.model, DEV[0], verbose=0),
            atol=1e-6,
        )

    def test_magnitudes_start_at_the_column_norms(self):
        # Checks the reference the bidora test compares with.
        for layer in BiDoRAModel(build_task(), rank=RANK).adapted_layers:
            kernel = to_numpy(layer.layer.kernel)
            self.assertAllClose(
                layer.magnitude, np.linalg.norm(kernel, axis=0), atol=1e-6
            )

    def test_bidora_retrain_keeps_the_bilevel_magnitudes(self):
        keras.utils.set_random_seed(0)
        task = build_task()
        before = {v.path: to_numpy(v) for v in task.weights}
        magnitudes = MagnitudeLog()
        result = finetune(task, "bidora", callbacks=[magnitudes])
        self.assertEqual(list(result.steps), ["bilevel", "retrain"])
        # 64 examples: 51 lower (4 batches of 16) and 13 upper; retrain
        # trains on all 64.
        self.assertEqual(result.steps, {"bilevel": 4, "retrain": 4})
        bilevel, retrain = magnitudes.phases
        layers = result.model.adapted_layers
        self.assertLen(layers, 4)
        for layer, m_bilevel, m_retrain in zip(layers, bilevel, retrain):
            kernel = before[layer.layer.kernel.path]
            self.assertAllClose(to_numpy(layer.layer.kernel), kernel)
            # `m` starts at W0's column norms and the bi-level phase moves it.
            self.assertNotAllClose(
                m_bilevel, np.linalg.norm(kernel, axis=0), atol=1e-4
            )
            self.assertAllClose(m_retrain, m_bilevel)
        self.assertIn("upper_loss", result.history["bilevel"])
        self.assert_merged_matches_trained(result)

    def test_a_builder_and_a_seed_make_a_run_reproducible(self):
        first = finetune(build_task, "lora", seed=3, merge=False)
        second = finetune(build_task, "lora", seed=3, merge=False)
        self.assertAllClose(first.dev_outputs, second.dev_outputs, atol=0)
        self.assertEqual(first.batch_loss, second.batch_loss)

    def test_bad_arguments_are_value_errors_naming_them(self):
        task = build_task()
        cases = [
            (dict(method="adalora"), "'adalora'"),
            (dict(method="lora", loss=None), "loss=None"),
            (dict(method="bidora", retrain_init="warm"), "'warm'"),
            (
                dict(method="bidora", upper_batch_size="half"),
                "upper_batch_size='half'",
            ),
            (dict(method="keras-lora", dropout=0.1), "dropout=0.1"),
            (dict(method="keras-lora", targets=["nothing"]), "nothing"),
            (dict(method="lora", targets=["nothing"]), "nothing"),
            # Keras would fit no epoch, and the retrain phase be skipped,
            # without a word.
            (dict(method="lora", epochs=0), "epochs=0"),
            (dict(method="bidora", retrain_epochs=-1), "retrain_epochs=-1"),
            (dict(method="bidora", epochs=1.5), "epochs=1.5"),
        ]
        for kwargs, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                finetune(task, **kwargs)
        texts, labels = ["a good film", "a bad film"], np.array([1, 0])
        for method in ("lora", "keras-lora"):
            with self.assertRaisesRegex(ValueError, f"method={method!r}"):
                recipes.finetune(
                    task, (texts, labels), method=method, loss="mse"
                )


class EpochLog(keras.callbacks.Callback):
    """The weights and `val_loss` at the end of each epoch."""

    def __init__(self):
        super().__init__()
        self.weights, self.val_loss = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append([to_numpy(v) for v in self.model.weights])
        self.val_loss.append(float(logs["val_loss"]))


def cross_entropy(logits, labels):
    """The mean sparse categorical cross-entropy of logits, in NumPy."""
    logits = logits - logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-np.mean(log_p[np.arange(len(labels)), labels]))


def stopping_epochs(losses, patience, min_steps, steps_per_epoch=3, most=12):
    """The epochs early stopping trains, from the held-out losses: it
    stops at the first epoch whose best is `patience` epochs old once
    `min_steps` steps have run (3 an epoch: 48 examples in batches of 16),
    or after `most` epochs."""
    for epoch in range(1, len(losses)):
        best = int(np.argmin(losses[: epoch + 1]))
        steps = (epoch + 1) * steps_per_epoch
        if epoch - best >= patience and steps >= min_steps:
            return epoch + 1
    return most


class EarlyStoppingTest(TestCase):
    def test_held_out_count_keeps_one_example_on_each_side(self):
        # round(fraction * count), clipped to [1, count - 1].
        for count, fraction, expected in (
            (100, 0.1, 10),
            (5, 0.1, 1),  # round gives 0: one is held out
            (2, 0.9, 1),  # round gives 2: one is kept to fit
            (300, 0.1, 30),
        ):
            self.assertEqual(recipes.held_out_count(count, fraction), expected)
            _, held = recipes.hold_out(
                (np.arange(count), np.arange(count)), fraction, seed=0
            )
            self.assertLen(held[0], expected)

    def test_hold_out_is_a_seeded_partition_of_every_structure(self):
        texts = [f"text {i}" for i in range(20)]
        pairs = (texts, [f"second {i}" for i in range(20)])
        x = {"token_ids": np.arange(20)[:, None] * np.ones((1, 3), int)}
        y = np.arange(20)
        for data in ((x, y), (texts, y), (pairs, y, y * 2.0), (texts, None)):
            fitted, held_out = recipes.hold_out(data, 0.25, seed=4)
            self.assertLen(fitted, len(data))
            order = np.random.default_rng(4).permutation(20)
            expected_out, expected_in = np.sort(order[:5]), np.sort(order[5:])
            for part, indices in (
                (fitted, expected_in),
                (held_out, expected_out),
            ):
                first = part[0]
                if isinstance(first, dict):
                    self.assertAllClose(first["token_ids"][:, 0], indices)
                elif isinstance(first, tuple):
                    self.assertEqual(
                        list(first[1]), [f"second {i}" for i in indices]
                    )
                else:
                    self.assertEqual(
                        list(first), [f"text {i}" for i in indices]
                    )
                if data[1] is None:
                    self.assertIsNone(part[1])
                else:
                    self.assertAllClose(part[1], indices)
                if len(data) == 3:
                    self.assertAllClose(part[2], indices * 2.0)

    def test_bad_early_stopping_settings_are_value_errors(self):
        cases = [
            (dict(early_stopping_patience=0), "early_stopping_patience=0"),
            (
                dict(early_stopping_patience=True),
                "early_stopping_patience=True",
            ),
            (dict(early_stopping_patience=2.0), "early_stopping_patience=2.0"),
            (
                dict(early_stopping_patience=2, early_stopping_fraction=1.0),
                "early_stopping_fraction=1.0",
            ),
            (
                dict(early_stopping_patience=2, early_stopping_min_steps=-1),
                "early_stopping_min_steps=-1",
            ),
            (
                dict(early_stopping_patience=2, early_stopping_min_steps=2.5),
                "early_stopping_min_steps=2.5",
            ),
            (dict(early_stopping_min_steps=5), "early_stopping_patience=None"),
        ]
        task = build_task()
        before = [to_numpy(v) for v in task.weights]
        for kwargs, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                finetune(task, "lora", **kwargs)
        # Nothing was adapted or trained before the error.
        self.assertLen(task.weights, len(before))
        for value, old in zip(task.weights, before):
            self.assertAllClose(to_numpy(value), old, atol=0)

    def assert_restores_the_best_epoch(
        self, result, log, phase, patience, min_steps=0
    ):
        losses = log.val_loss
        best = int(np.argmin(losses))
        self.assertEqual(result.best_epochs[phase], best + 1)
        self.assertAllClose(result.stopping_loss[phase], losses[best])
        self.assertLen(losses, stopping_epochs(losses, patience, min_steps))
        self.assertLen(result.model.weights, len(log.weights[best]))
        for restored, kept in zip(result.model.weights, log.weights[best]):
            self.assertAllClose(to_numpy(restored), kept, atol=0)

    def stopped_run(self, method, patience, callbacks=(), **kwargs):
        """`method` on random labels (the held-out loss rises once the
        model memorises), early stopped on a quarter of the training data;
        `(result, epoch log, held-out part)`."""
        rng = np.random.default_rng(0)
        train = (TRAIN[0], rng.integers(0, 2, len(TRAIN[1])))
        log = EpochLog()
        result = finetune(
            build_task,
            method,
            train=train,
            epochs=12,
            learning_rate=3e-2,
            validation=True,
            callbacks=[*callbacks, log],
            early_stopping_patience=patience,
            early_stopping_fraction=0.25,
            **kwargs,
        )
        fitted, held_out = recipes.hold_out(train, 0.25, config.SEED)
        self.assertLen(fitted[1], 48)
        return result, log, held_out

    def assert_stopping_loss_is_held_out_loss(self, result, held_out, phase):
        # The watched loss is the held-out training data's, not dev's.
        logits = keras.Model.predict(result.model, held_out[0], verbose=0)
        self.assertAllClose(
            cross_entropy(logits, held_out[1]),
            result.stopping_loss[phase],
            atol=1e-5,
        )

    def test_lora_stops_on_held_out_training_data_and_restores_the_best(self):
        result, log, held_out = self.stopped_run("lora", patience=2)
        self.assert_restores_the_best_epoch(result, log, "train", 2)
        self.assert_stopping_loss_is_held_out_loss(result, held_out, "train")
        self.assertEqual(result.steps["train"], 3 * len(log.val_loss))

    def test_min_steps_delay_the_stop_and_the_best_epoch_is_restored(self):
        result, log, held_out = self.stopped_run(
            "lora", patience=1, early_stopping_min_steps=18
        )
        self.assertGreaterEqual(len(log.val_loss), 6)
        # Without the minimum it would have stopped sooner: the minimum,
        # not the losses, kept it training.
        self.assertLess(stopping_epochs(log.val_loss, 1, 0), len(log.val_loss))
        self.assert_restores_the_best_epoch(result, log, "train", 1, 18)
        self.assert_stopping_loss_is_held_out_loss(result, held_out, "train")

    def test_min_steps_leave_another_callbacks_stop_alone(self):
        class StopAfterTwo(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                self.model.stop_training = epoch == 1

        result, log, _ = self.stopped_run(
            "lora",
            patience=1,
            early_stopping_min_steps=1000,
            callbacks=[StopAfterTwo()],
        )
        self.assertLen(log.val_loss, 2)
        self.assertLen(result.history["train"]["val_loss"], 2)

    def test_bidora_stops_each_phase(self):
        result, log, held_out = self.stopped_run(
            "bidora",
            patience=1,
            retrain_epochs=12,
            direction_regularization=0.0,
            merge=False,
        )
        self.assertEqual(sorted(result.best_epochs), ["bilevel", "retrain"])
        bilevel = len(result.history["bilevel"]["val_loss"])
        self.assertEqual(
            result.history["bilevel"]["val_loss"], log.val_loss[:bilevel]
        )
        log.val_loss = log.val_loss[bilevel:]
        log.weights = log.weights[bilevel:]
        self.assert_restores_the_best_epoch(result, log, "retrain", 1)
        self.assert_stopping_loss_is_held_out_loss(result, held_out, "retrain")


class PrepareTest(TestCase):
    def test_prepare_tokenizes_at_the_task_length_and_scores(self):
        train = load_task("sst2", "train", limit=8)
        dev = load_task("sst2", "dev", limit=4)
        prepared = recipes.prepare(
            train.spec, resolve_preset(None), train, dev, log=None
        )
        length = config.sequence_length("sst2")
        self.assertEqual(prepared.x_train["token_ids"].shape, (8, length))
        self.assertEqual(prepared.x_dev["token_ids"].shape, (4, length))
        self.assertEqual(list(prepared.y_train), list(train.labels))
        perfect = np.eye(2)[np.asarray(dev.labels)]
        self.assertEqual(prepared.score(perfect), {"accuracy": 1.0})
        arguments = recipes.compile_arguments(get_task_spec("stsb"))
        self.assertIsInstance(arguments["loss"], keras.losses.MeanSquaredError)
        self.assertEqual(arguments["metrics"], [])
        # A KerasHub TextClassifier compiled with them reports no accuracy
        # for regression (its own compile would add one).
        task = build_task()
        task.compile(optimizer="adam", **arguments)
        targets = np.eye(2, dtype="float32")[TRAIN[1]]
        history = keras.Model.fit(task, TRAIN[0], targets, verbose=0)
        self.assertEqual(list(history.history), ["loss"])
