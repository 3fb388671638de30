"""What `BiDoRAModel` feeds Keras: bi-level batches, raw inputs preprocessed.

`bilevel_data` builds the bi-level phase's `(lower, upper, due)` batches
from whatever `fit` received; `plain_data` the batches of the other phases,
`evaluate` and `predict` when the inputs are raw, and `one_batch` the batch
of `train_on_batch`, `test_on_batch` and `predict_on_batch` (token arrays
go to Keras untouched).
"""

import keras
import numpy as np

from keras_bidora import config
from keras_bidora.training import raw_inputs
from keras_bidora.training.bilevel_dataset import ArraySource
from keras_bidora.training.bilevel_dataset import Batches
from keras_bidora.training.bilevel_dataset import BatchSource
from keras_bidora.training.bilevel_dataset import BiLevelDataset
from keras_bidora.training.bilevel_dataset import check_no_labels
from keras_bidora.training.bilevel_dataset import first_batch_size
from keras_bidora.training.bilevel_dataset import is_dataset
from keras_bidora.training.bilevel_dataset import pack_batch
from keras_bidora.training.bilevel_dataset import split_sources
from keras_bidora.training.bilevel_dataset import stream


class Prepared:
    """Data for `keras.Model.fit`, a first lower batch, and its callbacks.

    `epoch_setter` is the object whose `set_epoch(epoch)` must run at each
    epoch's start (or None).
    """

    def __init__(self, data, first_batch, epoch_setter=None):
        self.data = data
        self.first_batch = first_batch
        self.epoch_setter = epoch_setter


def bilevel_data(
    model,
    x,
    y,
    sample_weight,
    upper_data,
    batch_size,
    upper_batch_size,
    shuffle,
):
    """The bi-level batches of `fit(x, y, sample_weight, upper_data=...)`.

    Args:
        model: the `BiDoRAModel` (its wrapped task preprocesses raw data).
        x, y, sample_weight: `fit`'s training data.
        upper_data: `fit`'s `upper_data`, or None.
        batch_size: the lower batch size (of arrays, or of an unbatched
            dataset).
        upper_batch_size: the upper batch size, `"proportional"`, or None
            for the model's `upper_batch_size` (None there: `batch_size`,
            or a dataset's own batches).
        shuffle: reshuffle arrays and `PyDataset` batches at each epoch.

    Returns:
        A `Prepared`.
    """
    upper_data = _packed_upper_data(model.model, upper_data)
    raw = _check(model.model, x, y, upper_data)
    x = raw_inputs.as_arrays(x)
    batch_size = batch_size or config.BATCH_SIZE
    requested_upper_batch_size = _resolved_upper_batch_size(
        upper_batch_size or model.upper_batch_size,
        x,
        batch_size,
        model.upper_fraction,
    )
    upper_batch_size = requested_upper_batch_size or batch_size
    upper_data = _as_arrays_or_dataset(upper_data)
    if raw_inputs.is_tf_dataset(x):
        check_no_labels(y, sample_weight)
        if upper_data is not None and not raw_inputs.is_tf_dataset(upper_data):
            upper_data = _endless_batches(upper_data, upper_batch_size)
        data = stream(
            x,
            upper_data,
            model.upper_fraction,
            batch_size,
            requested_upper_batch_size,
            model.upper_every,
            model.seed,
            preprocess=raw_inputs.preprocess_function(model.model)
            if raw
            else None,
        )
        first = raw_inputs.to_numpy(next(iter(data))[0])
        return Prepared(data, first)
    lower, upper = split_sources(
        x,
        y,
        sample_weight,
        upper_data,
        model.upper_fraction,
        batch_size,
        requested_upper_batch_size,
        shuffle,
        model.seed,
    )
    transform = raw_inputs.batch_transform(model.model, raw)
    data = BiLevelDataset(lower, upper, model.upper_every, transform)
    return Prepared(data, data[0][0], epoch_setter=data)


def _resolved_upper_batch_size(upper_batch_size, x, batch_size, fraction):
    """An integer upper batch size, or None, for `"proportional"` too.

    `"proportional"` is relative to the lower batch size: `batch_size` for
    arrays and unbatched datasets, the first batch's size for a batched
    `tf.data.Dataset` or a `PyDataset`. It takes `upper_fraction`'s ratio
    even when `upper_data` is given, so that the size does not depend on
    reading (or knowing the length of) a stream.
    """
    if upper_batch_size != config.UPPER_BATCH_SIZE_PROPORTIONAL:
        return upper_batch_size
    if isinstance(x, keras.utils.PyDataset) or (
        raw_inputs.is_tf_dataset(x) and raw_inputs.is_batched(x)
    ):
        batch_size = first_batch_size(x)
    return config.proportional_upper_batch_size(batch_size, fraction)


def plain_data(model, x, y, sample_weight, batch_size, shuffle, what="x"):
    """Raw data as preprocessed batches; None when `x` is not raw.

    Args:
        model: the `BiDoRAModel`.
        x, y, sample_weight: the data, as `keras.Model.fit` takes it.
        batch_size: the batch size (arrays and unbatched datasets).
        shuffle: reshuffle arrays (seeded) at each epoch.
        what: the argument's name, for error messages.

    Returns:
        None, or a `Prepared` (its `first_batch` is None).
    """
    if not raw_inputs.is_raw(x):
        return None
    raw_inputs.check_task(model.model, x, y, what=what)
    batch_size = batch_size or config.BATCH_SIZE
    transform = raw_inputs.batch_transform(model.model, True)
    if raw_inputs.is_tf_dataset(x):
        check_no_labels(y, sample_weight)
        data = raw_inputs.map_dataset(model.model, x, batch_size)
        return Prepared(data, None)
    if isinstance(x, keras.utils.PyDataset):
        check_no_labels(y, sample_weight)
        source = BatchSource(x, range(x.num_batches), shuffle, model.seed)
    else:
        x = raw_inputs.as_arrays(x)
        source = ArraySource(
            x, y, sample_weight, batch_size, shuffle, model.seed
        )
    batches = Batches(source, transform)
    return Prepared(batches, None, epoch_setter=batches)


def one_batch(model, x, y=None, sample_weight=None, what="x"):
    """One batch `(x, y, sample_weight)`, raw inputs preprocessed.

    As a KerasHub task's `train_on_batch`, `test_on_batch` and
    `predict_on_batch` take raw samples: they go through the task's
    preprocessor (`y` and `sample_weight` with them); other inputs are
    returned as they are.
    """
    if not raw_inputs.is_raw(x):
        return x, y, sample_weight
    raw_inputs.check_task(model.model, x, y, what=what)
    transform = raw_inputs.batch_transform(model.model, True)
    batch = transform((raw_inputs.as_arrays(x), y, sample_weight))
    return keras.utils.unpack_x_y_sample_weight(batch)


def bilevel_batch(model, x, y, sample_weight, upper_data):
    """`train_on_batch`'s data for the bi-level step, as `fit` gives it.

    Args:
        model: the `BiDoRAModel`.
        x, y, sample_weight: the lower batch.
        upper_data: `(x, y)` or `(x, y, sample_weight)` (a causal LM's: its
            `x` alone), or None for a lower step alone.

    Returns:
        `(lower_batch, upper_batch, due)`, raw inputs preprocessed, `due`
        one flag per lower sample. Without `upper_data`, the flags are
        False and the upper batch is the lower one, which the step leaves
        unread.
    """
    lower = one_batch(model, x, y, sample_weight)
    upper = lower
    if upper_data is not None:
        upper = _upper_batch(model, x, y, upper_data)
    lower, upper = (pack_batch(*batch) for batch in (lower, upper))
    size = len(keras.tree.flatten(lower[0])[0])
    return lower, upper, np.full((size,), upper_data is not None)


def _upper_batch(model, x, y, upper_data):
    """`upper_data` as `(x, y, sample_weight)`, matching `x, y` in kind."""
    upper_data = _packed_upper_data(model.model, upper_data)
    if not isinstance(upper_data, (tuple, list)) or len(upper_data) not in (
        1,
        2,
        3,
    ):
        raise ValueError(
            "upper_data must be one batch: a tuple (x, y) or (x, y, "
            "sample_weight) (a causal LM's: its x alone). Received: "
            f"upper_data of type {type(upper_data).__name__}"
        )
    upper_data = tuple(upper_data)
    _check(model.model, x, y, upper_data)
    return one_batch(
        model,
        *keras.utils.unpack_x_y_sample_weight(upper_data),
        what="upper_data",
    )


def class_weighted(x, y, sample_weight, upper_data, class_weight):
    """`(sample_weight, upper_data)` with `class_weight` as sample weights.

    As `keras.Model.fit` reads `class_weight`: each sample weighs its
    class's weight (1 for a class not listed; one-hot labels by their
    largest entry). In the bi-level phase both levels' samples are
    weighted, the labels of `x` and of an `upper_data` given as arrays.

    Raises:
        ValueError: for a dataset or no labels, which have no label arrays
            to read, and for `class_weight` with sample weights.
    """
    upper = upper_data
    if (
        is_dataset(x)
        or y is None
        or (upper is not None and not isinstance(upper, (tuple, list)))
    ):
        raise ValueError(
            "class_weight in the bi-level phase weighs labels given as "
            "arrays (x, y and upper_data); give a dataset's elements sample "
            f"weights instead. Received: x of type {type(x).__name__}, y "
            f"of type {type(y).__name__}, upper_data of type "
            f"{type(upper_data).__name__}"
        )
    sample_weight = _class_sample_weights(y, sample_weight, class_weight)
    if upper is not None:
        x_up, y_up, w_up = keras.utils.unpack_x_y_sample_weight(tuple(upper))
        upper = (x_up, y_up, _class_sample_weights(y_up, w_up, class_weight))
    return sample_weight, upper


def _class_sample_weights(y, sample_weight, class_weight):
    if sample_weight is not None:
        raise ValueError(
            "sample_weight and class_weight cannot both be given, as in "
            f"keras.Model.fit. Received: class_weight={class_weight}"
        )
    if y is None:
        raise ValueError("class_weight needs labels: upper_data has none.")
    labels = keras.ops.convert_to_numpy(y)
    if labels.ndim > 1:
        one_hot = labels.shape[-1] != 1
        labels = labels.argmax(-1) if one_hot else labels[..., 0]
    labels = np.round(labels).astype("int64")
    weights = [class_weight.get(int(label), 1.0) for label in labels]
    return np.asarray(weights, keras.config.floatx())


def validation_batches(model, validation_data, batch_size):
    """`validation_data` with raw inputs preprocessed (else unchanged)."""
    if validation_data is None or raw_inputs.is_tf_dataset(validation_data):
        x, y, sample_weight = validation_data, None, None
    elif isinstance(validation_data, keras.utils.PyDataset):
        x, y, sample_weight = validation_data, None, None
    else:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
            tuple(validation_data)
        )
    prepared = plain_data(
        model, x, y, sample_weight, batch_size, False, "validation_data"
    )
    return validation_data if prepared is None else prepared.data


def _packed_upper_data(task, upper_data):
    """`upper_data` as `(x, ...)`: a generative task's is often x alone."""
    if (
        raw_inputs.is_generative(task)
        and upper_data is not None
        and not isinstance(upper_data, (tuple, keras.utils.PyDataset))
        and not raw_inputs.is_tf_dataset(upper_data)
    ):
        return (upper_data,)
    return upper_data


def _check(task, x, y, upper_data):
    """Whether `x` is raw; a `ValueError` for what cannot be trained on."""
    raw = raw_inputs.is_raw(x)
    if raw:
        raw_inputs.check_task(task, x, y)
    if upper_data is None:
        return raw
    upper_x = _features(upper_data, packed=True)
    x = _features(x, packed=False)
    if raw_inputs.is_raw(upper_x) != raw or _structure(upper_x) != _structure(
        x
    ):
        raise ValueError(
            "upper_data must hold the same kind of features as x. "
            f"Received: x with features {_describe(x)}, upper_data with "
            f"features {_describe(upper_x)}"
        )
    return raw


def _features(data, packed):
    """The features of `x` (or, `packed`, of `(x, y, ...)`) or a dataset."""
    if raw_inputs.is_tf_dataset(data):
        data, packed = data.element_spec, True
    elif isinstance(data, keras.utils.PyDataset):
        return None
    if packed and isinstance(data, (tuple, list)) and len(data) in (1, 2, 3):
        return data[0]
    return data


def _structure(features):
    if features is None:
        return None
    return raw_inputs.map_leaves(features, lambda leaf: "leaf")


def _describe(features):
    if features is None:
        return "a PyDataset's"
    kind = "raw strings" if raw_inputs.is_raw(features) else "arrays"
    return f"{kind} structured as {_structure(features)}"


def _as_arrays_or_dataset(upper_data):
    if upper_data is None or raw_inputs.is_tf_dataset(upper_data):
        return upper_data
    if isinstance(upper_data, (tuple, list)):
        return tuple(raw_inputs.as_arrays(tuple(upper_data)))
    return upper_data


def _endless_batches(upper_data, batch_size):
    """Arrays (or a `PyDataset`) as an endless `tf.data.Dataset` of batches."""
    import tensorflow as tf

    if isinstance(upper_data, keras.utils.PyDataset):
        raise ValueError(
            "When x is a tf.data.Dataset, upper_data must be a "
            "tf.data.Dataset or arrays. Received: upper_data of type "
            f"{type(upper_data).__name__}"
        )
    elements = keras.utils.pack_x_y_sample_weight(
        *keras.utils.unpack_x_y_sample_weight(upper_data)
    )
    return (
        tf.data.Dataset.from_tensor_slices(elements)
        .repeat()
        .batch(batch_size, drop_remainder=True)
    )
