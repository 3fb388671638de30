"""BiDoRAModel as a drop-in for the KerasHub task it wraps.

Raw text goes through the task's preprocessor in `fit`, `evaluate`,
`predict` and the `*_on_batch` methods; `generate` and the sampler are the
task's. References: the task itself (its own `predict` and preprocessor)
and NumPy losses.
"""

import os
import subprocess
import sys
import textwrap

import keras
import keras_hub
import numpy as np
import pytest

from keras_bidora import BiDoRAModel
from keras_bidora import merge
from keras_bidora.data import load_e2e
from keras_bidora.training import raw_inputs
from tests.test_case import TestCase
from tests.test_case import to_numpy

WORDS = ["good", "bad", "movie", "a", "the", "plot", "was", "very"]
POSITIVE = ["good movie", "a very good plot", "the movie was good"]
NEGATIVE = ["bad movie", "a very bad plot", "the movie was bad"]
STORIES = ["the cat sat", "a dog ran off", "the bird sang", "fish swim"]


def classifier(sequence_length=8, dropout=0.1):
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary),
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=sequence_length,
        dropout=dropout,
    )
    _spread_embeddings(backbone)
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=preprocessor, dropout=dropout
    )


def _spread_embeddings(backbone):
    """Weights of a pretrained model's size on a 16-wide random backbone.

    KerasHub's random init (std 0.02 everywhere) makes a backbone whose
    outputs hardly depend on the text (they differ by 1e-4), so that a few
    steps of adapter training cannot tell the texts apart. Glorot-sized
    kernels and spread token embeddings make the text matter.
    """
    for variable in backbone.weights:
        if variable.path.endswith("kernel"):
            variable.assign(variable * 15.0)
    embeddings = backbone.token_embedding.embeddings
    embeddings.assign(embeddings * 25.0)


def reviews(copies=5):
    texts = (POSITIVE + NEGATIVE) * copies
    labels = np.array(([1] * 3 + [0] * 3) * copies)
    return texts, labels


def gpt2_tokenizer():
    """A byte-level BPE tokenizer over printable ASCII (no downloads)."""
    # GPT-2's byte-to-unicode map sends a space to "\u0120" and keeps the
    # printable ASCII characters.
    characters = ["\u0120"] + [chr(code) for code in range(33, 127)]
    vocabulary = {"<|endoftext|>": 0}
    for character in characters + ["\u0120t", "th"]:
        vocabulary[character] = len(vocabulary)
    return keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=["\u0120 t", "t h"]
    )


def causal_lm(sequence_length=16, max_sequence_length=32, dropout=0.1):
    tokenizer = gpt2_tokenizer()
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=max_sequence_length,
        dropout=dropout,
    )
    _spread_embeddings(backbone)
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor)


def sentence_piece_proto(texts, pad, start, end):
    """A small SentencePiece model trained in memory (no downloads)."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece=pad,
        unk_piece="<unk>",
        bos_piece=start,
        eos_piece=end,
        minloglevel=3,
    )
    return model.getvalue()


# Per family: the tokenizer's pad, start and end pieces, and the classes.
SENTENCE_PIECE_FAMILIES = {
    "gemma": (("<pad>", "<bos>", "<eos>"), {"head_dim": 8}),
    "llama": (("<pad>", "<s>", "</s>"), {}),
}


def sentence_piece_causal_lm(family, texts, sequence_length):
    """A tiny random Gemma or Llama `CausalLM` with its preprocessor."""
    pieces, backbone_kwargs = SENTENCE_PIECE_FAMILIES[family]
    name = family.capitalize()
    tokenizer = getattr(keras_hub.models, f"{name}Tokenizer")(
        sentence_piece_proto(texts, *pieces)
    )
    backbone = getattr(keras_hub.models, f"{name}Backbone")(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        **backbone_kwargs,
    )
    preprocessor = getattr(keras_hub.models, f"{name}CausalLMPreprocessor")(
        tokenizer, sequence_length=sequence_length
    )
    causal_lm_class = getattr(keras_hub.models, f"{name}CausalLM")
    return causal_lm_class(backbone, preprocessor=preprocessor)


def masked_cross_entropy(logits, y, sample_weight):
    """Keras's sum-over-batch-size cross-entropy, in NumPy."""
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, y[..., None], -1)[..., 0]
    return float(-(picked * sample_weight).sum() / sample_weight.size)


def weights_of(model):
    return [to_numpy(v).copy() for v in model.weights]


class ClassifierFlowTest(TestCase):
    def setUp(self):
        keras.utils.set_random_seed(0)
        self.task = classifier()
        self.model = BiDoRAModel(self.task, rank=2)
        self.model.compile(optimizer=keras.optimizers.Adam(3e-2))
        self.texts, self.labels = reviews()

    def test_fit_raw_strings_then_predict_like_the_task(self):
        before = self.model.evaluate(self.texts, self.labels, verbose=0)
        history = self.model.fit(
            self.texts, self.labels, batch_size=8, epochs=4, verbose=0
        )
        self.assertEqual(
            set(history.history),
            {"loss", "upper_loss", "sparse_categorical_accuracy"},
        )
        after = self.model.evaluate(self.texts, self.labels, verbose=0)
        self.assertLess(after[0], before[0])
        # The task's own pipeline (its preprocessor, then its layers, now
        # adapted in place) is the reference.
        self.assertAllClose(
            self.model.predict(self.texts[:6], verbose=0),
            self.task.predict(self.texts[:6], verbose=0),
            atol=1e-5,
        )
        # The evaluated loss is the cross-entropy of the predictions.
        logits = self.model.predict(self.texts, verbose=0)
        expected = masked_cross_entropy(
            logits, self.labels, np.ones(len(self.labels))
        )
        self.assertAllClose(after[0], expected, atol=1e-5)

    def test_fit_tf_data_batched_and_unbatched(self):
        import tensorflow as tf

        dataset = tf.data.Dataset.from_tensor_slices((self.texts, self.labels))
        for data, kwargs in (
            (dataset.batch(6), {}),
            (dataset, {"batch_size": 6}),
        ):
            logs = _StepLogger()
            self.model.fit(data, callbacks=[logs], verbose=0, **kwargs)
            # 5 batches of 6: one goes to the upper split.
            self.assertLen(logs.losses, 4)
            self.assertTrue(all(np.isfinite(logs.losses)))

    def test_py_dataset_sentence_pairs_and_raw_validation(self):
        pairs = (np.array(self.texts), np.array(self.texts[::-1]))
        dataset = _RawPyDataset(pairs, self.labels, batch_size=6)
        history = self.model.fit(
            dataset,
            validation_data=(pairs, self.labels),
            verbose=0,
        )
        self.assertIn("val_loss", history.history)
        # A pair goes to the preprocessor as `x=(first, second)`.
        tokens = self.task.preprocessor(
            x=(self.texts[:3], self.texts[::-1][:3])
        )
        self.assertAllClose(
            self.model.predict((pairs[0][:3], pairs[1][:3]), verbose=0),
            to_numpy(self.task(tokens)),
            atol=1e-5,
        )

    def test_retrain_on_raw_strings(self):
        self.model.fit(self.texts, self.labels, batch_size=8, verbose=0)
        magnitudes = [to_numpy(m).copy() for m in self.model.magnitudes]
        history = self.model.retrain(
            self.texts, self.labels, batch_size=8, verbose=0
        )
        self.assertIn("loss", history.history)
        for before, after in zip(magnitudes, self.model.magnitudes):
            self.assertAllClose(before, to_numpy(after), atol=0)

    def test_merged_task_saves_with_its_preprocessor(self):
        self.model.fit(self.texts, self.labels, batch_size=8, verbose=0)
        expected = self.model.predict(self.texts[:6], verbose=0)
        path = os.path.join(self.get_temp_dir(), "merged.keras")
        merge(self.model).save(path)
        served = keras.saving.load_model(path)  # keras_hub imported only
        self.assertIsInstance(served, keras_hub.models.BertTextClassifier)
        self.assertIsNotNone(served.preprocessor)
        self.assertAllClose(
            served.predict(self.texts[:6], verbose=0), expected, atol=1e-5
        )

    def test_save_to_preset_loads_as_the_plain_task(self):
        self.model.fit(self.texts, self.labels, batch_size=8, verbose=0)
        directory = os.path.join(self.get_temp_dir(), "preset")
        self.model.save_to_preset(directory)
        served = keras_hub.models.TextClassifier.from_preset(directory)
        self.assertIsInstance(served, keras_hub.models.BertTextClassifier)
        self.assertFalse([v.path for v in served.weights if "lora" in v.path])
        # The reference: the task's own pipeline, adapted in place.
        self.assertAllClose(
            served.predict(self.texts[:6], verbose=0),
            self.task.predict(self.texts[:6], verbose=0),
            atol=1e-5,
        )
        with self.assertRaisesRegex(AttributeError, "Functional.*preset"):
            inputs = keras.Input((4,))
            plain = keras.Model(inputs, keras.layers.Dense(2)(inputs))
            BiDoRAModel(plain, targets=[".*"]).save_to_preset(directory)

    def test_merged_task_exports_for_serving(self):
        if keras.config.backend() not in ("tensorflow", "jax"):
            self.skipTest("tf_saved_model export needs tensorflow or jax")
        import tensorflow as tf

        self.model.fit(self.texts, self.labels, batch_size=8, verbose=0)
        tokens = {
            name: np.asarray(value).astype("int32")
            for name, value in self.task.preprocessor(self.texts[:6]).items()
        }
        # On JAX, export needs a fixed sequence length (a dynamic one
        # fails in KerasHub's PositionEmbedding).
        signature = {
            name: keras.InputSpec(shape=(None, 8), dtype="int32")
            for name in tokens
        }
        directory = os.path.join(self.get_temp_dir(), "served")
        # BiDoRAModel.export exports merge(model).
        self.model.export(
            directory,
            format="tf_saved_model",
            input_signature=[signature],
            verbose=False,
        )
        served = tf.saved_model.load(directory)
        outputs = served.serve({k: tf.constant(v) for k, v in tokens.items()})
        self.assertAllClose(
            np.asarray(outputs),
            self.model.predict(self.texts[:6], verbose=0),
            atol=1e-5,
        )

    def test_on_batch_methods_take_raw_strings_like_the_task(self):
        # No dropout, no penalty: a training step's losses are then the
        # model's. References: the task's own preprocessor and layers, and
        # NumPy cross-entropies, taken before the step changes anything.
        task = classifier(dropout=0.0)
        model = BiDoRAModel(task, rank=2, direction_regularization=0)
        model.compile(optimizer=keras.optimizers.Adam(3e-2))
        lower, upper = self.texts[:6], self.texts[6:10]
        pairs = (lower[:3], lower[3:6])
        self.assertAllClose(
            model.predict_on_batch(pairs),
            to_numpy(task(task.preprocessor(x=pairs))),
            atol=1e-5,
        )
        expected = []
        for texts, labels in (
            (lower, self.labels[:6]),
            (upper, self.labels[6:10]),
        ):
            logits = to_numpy(task(task.preprocessor(texts)))
            expected.append(
                masked_cross_entropy(logits, labels, np.ones(len(labels)))
            )
        test_logs = model.test_on_batch(
            lower, self.labels[:6], return_dict=True
        )
        self.assertAllClose(test_logs["loss"], expected[0], atol=1e-5)
        magnitudes = [to_numpy(m).copy() for m in model.magnitudes]
        logs = model.train_on_batch(
            lower,
            self.labels[:6],
            upper_data=(upper, self.labels[6:10]),
            return_dict=True,
        )
        self.assertAllClose(logs["loss"], expected[0], atol=1e-5)
        self.assertAllClose(logs["upper_loss"], expected[1], atol=1e-5)
        for before, after in zip(magnitudes, model.magnitudes):
            self.assertNotAllClose(before, to_numpy(after), atol=1e-6)
        # After the step, still the task's pipeline.
        self.assertAllClose(
            model.predict_on_batch(lower),
            task.predict_on_batch(lower),
            atol=1e-5,
        )

    def test_raw_text_without_preprocessor_is_refused_unchanged(self):
        task = classifier()
        task.preprocessor = None
        model = BiDoRAModel(task, rank=2)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        before = weights_of(model)
        for phase in (model.fit, model.retrain):
            with self.assertRaisesRegex(ValueError, "no preprocessor"):
                phase(self.texts, self.labels, verbose=0)
        for old, new in zip(before, weights_of(model)):
            self.assertAllClose(old, new, atol=0)

    def test_upper_data_of_another_structure_is_refused(self):
        tokens = np.zeros((6, 8), "int32")
        before = weights_of(self.model)
        with self.assertRaisesRegex(ValueError, "same kind of features"):
            self.model.fit(
                self.texts,
                self.labels,
                upper_data=(tokens, self.labels[:6]),
                verbose=0,
            )
        for old, new in zip(before, weights_of(self.model)):
            self.assertAllClose(old, new, atol=0)


class CausalLMFlowTest(TestCase):
    def setUp(self):
        keras.utils.set_random_seed(0)
        self.task = causal_lm()
        self.model = BiDoRAModel(self.task, rank=2)
        self.model.compile(
            optimizer=keras.optimizers.Adam(3e-2), sampler="greedy"
        )
        self.texts = STORIES * 4

    def test_fit_loss_is_the_tasks_masked_loss(self):
        before = self.model.evaluate(self.texts, verbose=0)
        self.model.fit(self.texts, batch_size=4, epochs=3, verbose=0)
        after = self.model.evaluate(self.texts, batch_size=16, verbose=0)
        self.assertLess(after[0], before[0])
        # The reference: the task's preprocessor's targets and padding
        # weights, and a NumPy cross-entropy of the predicted logits.
        x, y, sample_weight = self.task.preprocessor(self.texts)
        logits = to_numpy(self.task(x))
        expected = masked_cross_entropy(
            logits, to_numpy(y), to_numpy(sample_weight).astype("float32")
        )
        self.assertAllClose(after[0], expected, atol=1e-4)

    def test_prompts_are_masked_out_of_the_loss(self):
        prompts = ["the cat ", "a dog "] * 4
        responses = ["sat", "ran off"] * 4
        data = {"prompts": prompts, "responses": responses}
        logs = _StepLogger()
        self.model.fit(data, batch_size=4, callbacks=[logs], verbose=0)
        self.assertLen(logs.losses, 2)
        preprocess = raw_inputs.batch_transform(self.task, raw=True)
        first = {key: np.array(value[:2]) for key, value in data.items()}
        x, y, weights = preprocess((first,))
        tokenizer = self.task.preprocessor.tokenizer
        for row in range(2):
            prompt, response = prompts[row], responses[row]
            prompt_tokens = len(to_numpy(tokenizer(prompt)))
            total = len(to_numpy(tokenizer(prompt + response)))
            # Targets 0..prompt_tokens-1 are the prompt's tokens; then the
            # response's and the end token are weighted.
            expected = np.zeros(y.shape[1])
            expected[prompt_tokens : total + 1] = 1
            self.assertAllClose(weights[row], expected, atol=0)

    def test_both_levels_weigh_the_responses_only(self):
        self.check_response_weights("fit")

    def test_train_on_batch_weighs_the_responses_only(self):
        self.check_response_weights("train_on_batch")

    def check_response_weights(self, run):
        # No dropout: the training step's loss is then the model's. `run`
        # is "fit" or "train_on_batch".
        task = causal_lm(dropout=0.0)
        model = BiDoRAModel(task, rank=2, direction_regularization=0)
        model.compile(optimizer=keras.optimizers.Adam(3e-2))
        lower = {"prompts": ["the cat ", "a dog "], "responses": ["sat", "ran"]}
        upper = {
            "prompts": ["fish ", "the bird "],
            "responses": ["swim", "sang"],
        }
        # The references, before the step changes anything: the task's
        # logits and a NumPy cross-entropy over the response tokens only,
        # the weights taken from the tokenizer's own token counts.
        tokenizer = model.model.preprocessor.tokenizer
        expected = []
        for data in (lower, upper):
            x, y, _ = model.model.preprocessor(
                [p + r for p, r in zip(*data.values())]
            )
            weights = np.zeros(y.shape, "float32")
            for row, (prompt, response) in enumerate(zip(*data.values())):
                start = len(to_numpy(tokenizer(prompt)))
                end = len(to_numpy(tokenizer(prompt + response))) + 1
                weights[row, start:end] = 1
            logits = to_numpy(model.model(x))
            expected.append(masked_cross_entropy(logits, to_numpy(y), weights))
        if run == "fit":
            logs = _StepLogger()
            model.fit(
                lower,
                upper_data=upper,
                batch_size=2,
                callbacks=[logs],
                verbose=0,
            )
            self.assertLen(logs.losses, 1)
            losses = logs.losses[0], logs.upper_losses[0]
        else:
            logs = model.train_on_batch(
                lower, upper_data=upper, return_dict=True
            )
            losses = logs["loss"], logs["upper_loss"]
        self.assertAllClose(losses[0], expected[0], atol=1e-5)
        self.assertAllClose(losses[1], expected[1], atol=1e-5)

    def test_generate_save_reload_merge(self):
        self.model.fit(self.texts, batch_size=4, epochs=2, verbose=0)
        prompt = ["the"]
        kwargs = {"max_length": 10, "stop_token_ids": None}
        generated = self.model.generate(prompt, **kwargs)
        self.assertIsInstance(generated[0], str)
        self.assertGreater(len(generated[0]), len(prompt[0]))
        path = os.path.join(self.get_temp_dir(), "lm.keras")
        self.model.save(path)
        restored = keras.saving.load_model(path)
        self.assertIsInstance(restored, BiDoRAModel)
        self.assertEqual(restored.generate(prompt, **kwargs), generated)
        self.assertAllClose(
            restored.predict(self.texts[:4], verbose=0),
            self.model.predict(self.texts[:4], verbose=0),
            atol=1e-5,
        )
        restored.fit(self.texts, batch_size=4, verbose=0)
        merged = merge(self.model)
        self.assertIsInstance(merged, keras_hub.models.GPT2CausalLM)
        self.assertEqual(merged.generate(prompt, **kwargs), generated)
        directory = os.path.join(self.get_temp_dir(), "preset")
        self.model.save_to_preset(directory)
        served = keras_hub.models.CausalLM.from_preset(directory)
        self.assertIsInstance(served, keras_hub.models.GPT2CausalLM)
        served.compile(sampler="greedy")
        self.assertEqual(served.generate(prompt, **kwargs), generated)

    def test_labels_for_a_causal_lm_are_refused(self):
        with self.assertRaisesRegex(ValueError, "takes its labels"):
            self.model.fit(self.texts, np.zeros(len(self.texts)), verbose=0)

    def test_generate_on_a_classifier_names_the_task(self):
        model = BiDoRAModel(classifier(), rank=2)
        with self.assertRaisesRegex(AttributeError, "BertTextClassifier"):
            model.generate(["a"])


class CausalLMFamiliesTest(TestCase):
    """Gemma- and Llama-shaped causal LMs fine-tuned on E2E prompts."""

    def check_family(self, family):
        keras.utils.set_random_seed(0)
        data = load_e2e("train", limit=16)
        texts = data["prompts"] + data["responses"]
        task = sentence_piece_causal_lm(family, texts, sequence_length=64)
        model = BiDoRAModel(task, rank=2)
        model.compile(optimizer=keras.optimizers.Adam(2e-2), sampler="greedy")
        self.assertGreater(len(model.adapted_layers), 0)
        before = model.evaluate(data, batch_size=8, verbose=0)
        model.fit(data, batch_size=4, epochs=3, verbose=0)
        after = model.evaluate(data, batch_size=8, verbose=0)
        self.assertLess(after[0], before[0])
        # The response tokens' loss is the task's own cross-entropy on the
        # preprocessed prompt + response, with the prompt masked.
        x, y, weights = raw_inputs.batch_transform(task, raw=True)((data,))
        logits = to_numpy(task(x))
        expected = masked_cross_entropy(
            logits, to_numpy(y), to_numpy(weights).astype("float32")
        )
        self.assertAllClose(after[0], expected, atol=1e-4)

        prompt = data["prompts"][0]
        kwargs = {"max_length": 48, "stop_token_ids": None}
        generated = model.generate(prompt, **kwargs)
        path = os.path.join(self.get_temp_dir(), "lm.keras")
        model.save(path)
        restored = keras.saving.load_model(path)
        self.assertEqual(restored.generate(prompt, **kwargs), generated)
        merged = merge(model)
        self.assertIsInstance(merged, type(task))
        self.assertEqual(merged.generate(prompt, **kwargs), generated)

    def test_gemma(self):
        self.check_family("gemma")

    def test_llama(self):
        self.check_family("llama")


class StreamTest(TestCase):
    @pytest.mark.large
    def test_memory_does_not_grow_with_the_stream(self):
        peaks = {n: _stream_peak_rss(n) for n in (100_000, 1_000_000)}
        # Tenfold the elements, the same memory (allowing 5% and noise).
        self.assertLess(
            peaks[1_000_000], peaks[100_000] * 1.05 + 30 * 2**20, peaks
        )


_STREAM_SCRIPT = textwrap.dedent(
    """
    import resource, sys, time
    import numpy as np, keras, tensorflow as tf
    from keras_bidora import BiDoRAModel
    n = int(sys.argv[1])
    def samples():
        rng = np.random.default_rng(0)
        for _ in range(n):
            yield rng.normal(size=8).astype("float32"), np.float32(1.0)
    spec = (tf.TensorSpec((8,), "float32"), tf.TensorSpec((), "float32"))
    data = tf.data.Dataset.from_generator(samples, output_signature=spec)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(8, name="query")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(1, name="head")(hidden))
    model = BiDoRAModel(base, rank=2, targets=["query"])
    model.compile(optimizer="adam", loss="mse")
    start = time.time()
    model.fit(data.batch(16), steps_per_epoch=20, epochs=2, verbose=0)
    elapsed = time.time() - start
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, elapsed)
    """
)


def _stream_peak_rss(elements):
    output = subprocess.run(
        [sys.executable, "-c", _STREAM_SCRIPT, str(elements)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.split()
    peak_kib, elapsed = float(output[-2]), float(output[-1])
    # It starts at once: nothing reads the stream ahead of the steps.
    assert elapsed < 60, elapsed
    return peak_kib * 1024


class _StepLogger(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []
        self.upper_losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(to_numpy(logs["loss"])))
        self.upper_losses.append(float(to_numpy(logs.get("upper_loss", 0))))


class _RawPyDataset(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return -(-len(self.y) // self.batch_size)

    def __getitem__(self, index):
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return tuple(a[part] for a in self.x), self.y[part]
