"""Raw inputs (text, prompt/response pairs) through the task's preprocessor.

A KerasHub task (`keras_hub.models.Task`) applies its preprocessor inside
`fit`, `evaluate` and `predict`, so its users pass raw strings. A
`BiDoRAModel` wrapping such a task does the same. Inputs are *raw* when
they hold strings (as in `keras_hub`'s `PipelineModel`); token arrays pass
through untouched, as before.

Structure follows `tf.data.Dataset.from_tensor_slices` (and KerasHub):
tuples and dicts are structure, a list is one array of samples. So
`x=(first_sentences, second_sentences)` is a batch of sentence pairs.

A causal LM's `x` may also be `{"prompts": [...], "responses": [...]}`:
the model learns to continue each prompt with its response, and the
prompt's tokens are masked out of the loss.
"""

import keras
import numpy as np

PROMPTS = "prompts"
RESPONSES = "responses"


def preprocessor_of(model):
    """The task's preprocessor, or None."""
    return getattr(model, "preprocessor", None)


def is_generative(model):
    """Whether the task generates text (a `CausalLM` or `Seq2SeqLM`)."""
    return callable(getattr(model, "generate", None))


def map_leaves(structure, fn):
    """`fn` on each leaf; tuples and dicts are structure, lists leaves."""
    if isinstance(structure, tuple):
        return tuple(map_leaves(item, fn) for item in structure)
    if isinstance(structure, dict):
        return {key: map_leaves(v, fn) for key, v in structure.items()}
    return fn(structure)


def leaves(structure):
    """The leaves of `structure`, with `map_leaves`'s rules."""
    found = []
    map_leaves(structure, found.append)
    return found


def _is_string_leaf(leaf):
    if isinstance(leaf, (str, bytes)):
        return True
    if isinstance(leaf, list):
        leaf = np.asarray(leaf, dtype=object)
    if isinstance(leaf, np.ndarray):
        array = leaf
        if array.dtype.kind in ("U", "S"):
            return True
        return array.dtype.kind == "O" and any(
            isinstance(item, (str, bytes)) for item in array.flat
        )
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and "string" in str(dtype)


def is_raw(data):
    """Whether `data` (arrays, or a dataset's element spec) holds strings."""
    if is_tf_dataset(data):
        return any(
            "string" in str(spec.dtype)
            for spec in keras.tree.flatten(data.element_spec)
        )
    if isinstance(data, keras.utils.PyDataset):
        # Its first batch tells; PyDatasets are indexable without cost.
        data = keras.utils.unpack_x_y_sample_weight(data[0])[0]
    return any(_is_string_leaf(leaf) for leaf in leaves(data))


def is_tf_dataset(data):
    return type(data).__module__.startswith("tensorflow") and hasattr(
        data, "element_spec"
    )


def as_arrays(structure):
    """Lists and strings as NumPy arrays, so samples can be indexed."""

    def convert(leaf):
        if leaf is None or not isinstance(leaf, (list, str, bytes)):
            return leaf
        return np.asarray(leaf)

    return map_leaves(structure, convert)


def check_task(model, x, y, what="x"):
    """Raises a `ValueError` when raw `x` cannot be preprocessed.

    Args:
        model: the wrapped model.
        x: the raw features.
        y: the labels given with them, or None.
        what: the argument's name, for the message.
    """
    if preprocessor_of(model) is None:
        raise ValueError(
            f"{what} holds raw strings, but the wrapped model "
            f"{type(model).__name__} has no preprocessor to tokenize them. "
            "Pass token arrays, or wrap a KerasHub task built with its "
            f"preprocessor. Received: {what} of type {type(x).__name__}"
        )
    if is_generative(model) and y is not None:
        raise ValueError(
            f"A {type(model).__name__} takes its labels from the text "
            "itself (the next tokens): pass raw text as x, or "
            '{"prompts": ..., "responses": ...}, and no y. Received: y of '
            f"type {type(y).__name__}"
        )
    if isinstance(x, dict) and set(x) & {PROMPTS, RESPONSES}:
        if set(x) != {PROMPTS, RESPONSES} or not is_generative(model):
            raise ValueError(
                'Prompt/response inputs are a dict {"prompts": ..., '
                '"responses": ...} given to a CausalLM. Received: keys '
                f"{sorted(x)} for a {type(model).__name__}"
            )


def preprocess_function(model):
    """A function `(x, y, sample_weight) -> batch` for raw batches."""
    preprocessor = preprocessor_of(model)

    def preprocess(x, y=None, sample_weight=None):
        if isinstance(x, dict) and PROMPTS in x:
            return _prompt_response(preprocessor, x[PROMPTS], x[RESPONSES])
        return model.preprocess_samples(x, y, sample_weight)

    return preprocess


def _prompt_response(preprocessor, prompts, responses):
    """The causal LM batch of `prompt + response`, prompts masked out.

    The target at position `t` is token `t + 1`; the targets that are
    prompt tokens (positions before the prompt's length) get weight 0.
    """
    import tensorflow as tf

    prompts = tf.convert_to_tensor(prompts)
    texts = tf.strings.join([prompts, tf.convert_to_tensor(responses)])
    x, y, sample_weight = preprocessor(texts)
    prompt_x, _, _ = preprocessor(prompts)
    # The prompt alone is packed as [start] + prompt + [end].
    ends = int(getattr(preprocessor, "add_end_token", True))
    starts = int(getattr(preprocessor, "add_start_token", True))
    prompt_mask = tf.convert_to_tensor(prompt_x["padding_mask"])
    prompt_tokens = tf.reduce_sum(tf.cast(prompt_mask, "int32"), -1)
    prompt_tokens = prompt_tokens - ends - starts
    positions = tf.range(tf.shape(tf.convert_to_tensor(y))[-1])
    keep = positions[None, :] >= (prompt_tokens + starts - 1)[:, None]
    weights = tf.convert_to_tensor(sample_weight)
    weights = tf.where(keep, weights, tf.zeros_like(weights))
    return x, y, weights


def _python_strings(leaf):
    """String arrays as lists of `str`, which KerasHub's tokenizers take."""
    if isinstance(leaf, np.ndarray) and leaf.dtype.kind in ("U", "S", "O"):
        return [
            item.decode("utf-8") if isinstance(item, bytes) else item
            for item in leaf.tolist()
        ]
    return leaf


def to_numpy(batch):
    """A preprocessed batch as NumPy arrays (from tf, jax or torch)."""

    def convert(value):
        if value is None:
            return None
        if hasattr(value, "numpy") and type(value).__module__.startswith(
            "tensorflow"
        ):
            return value.numpy()
        return keras.ops.convert_to_numpy(value)

    return keras.tree.map_structure(convert, batch)


def batch_transform(model, raw):
    """The per-batch function for a source: preprocessing when `raw`."""
    if not raw:
        return None
    preprocess = preprocess_function(model)

    def transform(batch):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        x = map_leaves(x, _python_strings)
        return to_numpy(preprocess(x, y, sample_weight))

    return transform


def map_dataset(model, dataset, batch_size):
    """A `tf.data.Dataset` of raw samples, batched and preprocessed."""
    import tensorflow as tf

    if not is_batched(dataset):
        dataset = dataset.batch(batch_size)
    preprocess = preprocess_function(model)

    def apply(*element):
        element = element[0] if len(element) == 1 else element
        return preprocess(*keras.utils.unpack_x_y_sample_weight(element))

    return dataset.map(apply, num_parallel_calls=tf.data.AUTOTUNE)


def is_batched(dataset):
    """Whether a dataset's elements carry a batch axis.

    Raw features are scalars per sample (a string), so a dataset whose
    first feature is a scalar is unbatched; any other is taken as batched,
    as `keras.Model.fit` takes it.
    """
    specs = keras.tree.flatten(dataset.element_spec)
    return bool(specs) and specs[0].shape.rank != 0
