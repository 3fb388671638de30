"""The lower/upper split and the batches the bi-level train step reads."""

import math

import keras
import numpy as np

from keras_bidora.training.raw_inputs import is_tf_dataset
from keras_bidora.training.raw_inputs import to_numpy


def _num_samples(structure):
    lengths = {len(a) for a in keras.tree.flatten(structure) if a is not None}
    if len(lengths) != 1:
        raise ValueError(
            "All arrays of the training data must have the same number of "
            f"samples. Received lengths: {sorted(lengths)}"
        )
    return lengths.pop()


def _take(structure, indices):
    return keras.tree.map_structure(
        lambda a: None if a is None else np.asarray(a)[indices], structure
    )


def pack_batch(x, y, sample_weight):
    """`(x,)`, `(x, y)` or `(x, y, sample_weight)`: a tuple, whatever `x`."""
    if sample_weight is not None:
        return (x, y, sample_weight)
    if y is not None:
        return (x, y)
    return (x,)


class ArraySource:
    """Batches of in-memory arrays, reshuffled per epoch with a fixed seed.

    With `full_batches`, every batch holds `min(batch_size, size)` samples:
    the last one wraps around to the start of the epoch's order. The upper
    split reads its batches so, so that a compiled step sees one upper
    batch shape whatever the split's size (JAX compiles a program per
    shape).
    """

    def __init__(
        self,
        x,
        y,
        sample_weight,
        batch_size,
        shuffle,
        seed,
        full_batches=False,
    ):
        self.data = (x, y, sample_weight)
        self.size = _num_samples(self.data)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.full_batches = full_batches

    def __len__(self):
        return math.ceil(self.size / self.batch_size)

    def order(self, epoch):
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def batch(self, index, order):
        start = index * self.batch_size
        if self.full_batches:
            width = min(self.batch_size, self.size)
            indices = order[(start + np.arange(width)) % self.size]
        else:
            indices = order[start : start + self.batch_size]
        return pack_batch(*_take(self.data, indices))


class BatchSource:
    """Batches of a `PyDataset`, visited in a per-epoch seeded order.

    Only the indices of its batches (`indices`) are held: each batch is
    read from `dataset` when the step needs it.
    """

    def __init__(self, dataset, indices, shuffle, seed):
        self.dataset = dataset
        self.indices = list(indices)
        self.shuffle = shuffle
        self.seed = seed

    def __len__(self):
        return len(self.indices)

    def order(self, epoch):
        if not self.shuffle:
            return np.arange(len(self.indices))
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(len(self.indices))

    def batch(self, index, order):
        return _numpy_batch(self.dataset[self.indices[order[index]]])


class StreamSource:
    """An upper split read from a `tf.data.Dataset` as the steps need it.

    Each epoch restarts the dataset (repeated when it runs out); a batch
    serves every lower step of its upper period. The batches are the
    dataset's own, or with a `batch_size` regrouped to that size.
    """

    def __init__(self, dataset, batch_size=None):
        if int(dataset.cardinality()) == 0:
            raise ValueError("upper_data is an empty dataset.")
        if batch_size is None:
            self.dataset = dataset.repeat()
        else:
            self.dataset = regrouped_stream(dataset, batch_size)

    def __len__(self):
        return 2**31

    def order(self, epoch):
        self._iterator = iter(self.dataset)
        self._index = None
        return None

    def batch(self, index, order):
        if index != self._index:
            self._index = index
            self._batch = _numpy_batch(next(self._iterator))
        return self._batch


class RegroupedSource:
    """A source's batches regrouped into batches of `batch_size` samples.

    Each epoch reads the source's batches in its epoch order, cycling when
    they run out, and cuts them into full batches of `min(batch_size,
    samples in the source)`, so that every upper batch of a `PyDataset` has
    one shape. A batch serves every lower step of its upper period; the
    batches are read in order, as `StreamSource`'s.
    """

    def __init__(self, source, batch_size):
        self.source = source
        self.batch_size = batch_size

    def __len__(self):
        return 2**31

    def order(self, epoch):
        self._source_order = self.source.order(epoch)
        self._reads = 0
        self._samples_read = 0
        self._pending = None
        self._index = None
        return None

    def batch(self, index, order):
        if index != self._index:
            self._index = index
            self._batch = self._next_batch()
        return self._batch

    def _next_batch(self):
        while self._pending_size() < self._width():
            self._read_one()
        width = self._width()
        batch = _take(self._pending, slice(0, width))
        self._pending = _take(self._pending, slice(width, None))
        return batch

    def _width(self):
        # The source's size is known once a whole cycle has been read.
        if self._reads < len(self.source):
            return self.batch_size
        if not self._samples_read:
            raise ValueError("The upper split holds no samples.")
        return min(self.batch_size, self._samples_read)

    def _read_one(self):
        read = self.source.batch(
            self._reads % len(self.source), self._source_order
        )
        if self._reads < len(self.source):
            self._samples_read += _num_samples(read)
        self._reads += 1
        self._pending = _concatenated(self._pending, read)

    def _pending_size(self):
        return 0 if self._pending is None else _num_samples(self._pending)


def _concatenated(first, second):
    if first is None:
        return second
    return keras.tree.map_structure(
        lambda a, b: np.concatenate([a, b]), first, second
    )


def _numpy_batch(batch):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
    return pack_batch(*to_numpy((x, y, sample_weight)))


def is_dataset(x):
    return isinstance(x, keras.utils.PyDataset) or is_tf_dataset(x)


def split_sources(
    x,
    y,
    sample_weight,
    upper_data,
    upper_fraction,
    batch_size,
    upper_batch_size,
    shuffle,
    seed,
):
    """Builds the lower and upper sources from arrays or a `PyDataset`.

    Arrays (and dicts or tuples of arrays) are split by samples: a seeded
    permutation puts `upper_fraction` of them in the upper split. A
    `PyDataset` is split the same way by batches, which are read when a
    step needs them. With `upper_data`, all of `x` is lower data.

    The upper batches of arrays have `upper_batch_size` samples (None:
    `batch_size`); those of a `PyDataset` are its own batches, or with an
    `upper_batch_size` regrouped to that size (`RegroupedSource`).
    """
    if isinstance(x, keras.utils.PyDataset):
        check_no_labels(y, sample_weight)
        count = _py_dataset_length(x, "x")
        if upper_data is None:
            lower, upper = split_indices(count, upper_fraction, seed)
            upper = BatchSource(x, upper, shuffle, seed)
            return (
                BatchSource(x, lower, shuffle, seed),
                _regrouped(upper, upper_batch_size),
            )
        lower = BatchSource(x, range(count), shuffle, seed)
    else:
        if upper_data is None:
            return _split_arrays(
                (x, y, sample_weight),
                upper_fraction,
                batch_size,
                upper_batch_size or batch_size,
                shuffle,
                seed,
            )
        lower = ArraySource(x, y, sample_weight, batch_size, shuffle, seed)
    upper = upper_source(
        upper_data, upper_batch_size, batch_size, shuffle, seed + 1
    )
    return lower, upper


def _regrouped(source, batch_size):
    return source if batch_size is None else RegroupedSource(source, batch_size)


def check_no_labels(y, sample_weight):
    if y is not None or sample_weight is not None:
        raise ValueError(
            "When x is a dataset, y and sample_weight must be None: the "
            "dataset yields them. Received: "
            f"y={type(y).__name__}, "
            f"sample_weight={type(sample_weight).__name__}"
        )


def _py_dataset_length(dataset, what):
    count = dataset.num_batches
    if count is None:
        raise ValueError(
            f"{what} is an endless PyDataset (num_batches is None); the "
            "bi-level split needs its number of batches. Pass a "
            "tf.data.Dataset to stream endless data. Received: "
            f"{type(dataset).__name__}"
        )
    return count


def split_indices(count, upper_fraction, seed, unit="batch"):
    """The lower and upper indices of `count` batches (or samples).

    A seeded permutation picks `round(count * upper_fraction)` of them
    (at least one, and one fewer than all) for the upper split; each list
    is sorted.
    """
    if count < 2:
        raise ValueError(
            f"The dataset has fewer than 2 {unit}es, so none is left for "
            "the upper split. Pass more data, a smaller batch size, or "
            f"`upper_data`. Received: {count} {unit}(es)"
        )
    order = np.random.default_rng(seed).permutation(count)
    n_upper = min(count - 1, max(1, round(count * upper_fraction)))
    return np.sort(order[n_upper:]), np.sort(order[:n_upper])


def upper_sample_count(size, upper_fraction):
    """How many of `size` training samples the upper split of arrays holds:
    `round(size * upper_fraction)`.

    Raises:
        ValueError: when that leaves either split empty.

    Example:

    >>> from keras_bidora.training import bilevel_dataset
    >>> bilevel_dataset.upper_sample_count(90, 0.2)
    18
    """
    n_upper = round(size * upper_fraction)
    if n_upper < 1 or n_upper >= size:
        raise ValueError(
            f"upper_fraction={upper_fraction} of {size} training "
            f"samples leaves {n_upper} for the upper split and "
            f"{size - n_upper} for the lower split; both must be "
            "non-empty. Pass more data, another upper_fraction, or "
            "`upper_data`."
        )
    return n_upper


def _split_arrays(
    data, upper_fraction, batch_size, upper_batch_size, shuffle, seed
):
    """A seeded `upper_fraction` of the samples of `(x, y, sample_weight)`."""
    size = _num_samples(data)
    n_upper = upper_sample_count(size, upper_fraction)
    order = np.random.default_rng(seed).permutation(size)
    upper_idx, lower_idx = np.sort(order[:n_upper]), np.sort(order[n_upper:])
    lower = ArraySource(*_take(data, lower_idx), batch_size, shuffle, seed)
    upper = ArraySource(
        *_take(data, upper_idx),
        upper_batch_size,
        shuffle,
        seed + 1,
        full_batches=True,
    )
    return lower, upper


def upper_source(upper_data, upper_batch_size, batch_size, shuffle, seed):
    """The source of an explicit `upper_data`.

    A dataset's upper batches are its own, or with an `upper_batch_size`
    regrouped to that size; arrays are cut into batches of
    `upper_batch_size` (None: `batch_size`) samples.
    """
    if is_tf_dataset(upper_data):
        return StreamSource(upper_data, upper_batch_size)
    if isinstance(upper_data, keras.utils.PyDataset):
        count = _py_dataset_length(upper_data, "upper_data")
        if not count:
            raise ValueError("upper_data is an empty dataset.")
        source = BatchSource(upper_data, range(count), shuffle, seed)
        return _regrouped(source, upper_batch_size)
    if not isinstance(upper_data, (tuple, list)) or len(upper_data) not in (
        1,
        2,
        3,
    ):
        raise ValueError(
            "upper_data must be a tuple (x, y) or (x, y, sample_weight) (a "
            "causal LM's: its x alone), a tf.data.Dataset or a "
            "keras.utils.PyDataset. Received: upper_data of type "
            f"{type(upper_data).__name__}"
        )
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
        tuple(upper_data)
    )
    if _num_samples((x, y, sample_weight)) == 0:
        raise ValueError("upper_data holds no samples.")
    return ArraySource(
        x,
        y,
        sample_weight,
        upper_batch_size or batch_size,
        shuffle,
        seed,
        full_batches=True,
    )


class BiLevelDataset(keras.utils.PyDataset):
    """Yields `(lower_batch, upper_batch, upper_due)` for each lower step.

    An epoch is one pass over the lower batches. Every `upper_every`-th
    step of an epoch (counting from its first) carries an upper update; the
    upper batches cycle in order within an epoch and restart, reshuffled
    when `shuffle` is on, at each epoch. Shuffling is seeded by
    `(seed, epoch)`, so that an epoch's batches do not depend on what ran
    before it: resuming at an epoch boundary reproduces uninterrupted
    training.
    """

    def __init__(self, lower, upper, upper_every, transform=None):
        super().__init__()
        self.lower = lower
        self.upper = upper
        self.upper_every = upper_every
        self.transform = transform or (lambda batch: batch)
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self._lower_order = self.lower.order(epoch)
        self._upper_order = self.upper.order(epoch)

    def __len__(self):
        return len(self.lower)

    def __getitem__(self, index):
        due = index % self.upper_every == 0
        upper_index = (index // self.upper_every) % len(self.upper)
        lower = self.transform(self.lower.batch(index, self._lower_order))
        upper = self.upper.batch(upper_index, self._upper_order)
        # One flag per lower sample: Keras's data adapters want arrays of
        # rank >= 1, and a distribution shards every array along its batch
        # axis.
        size = len(keras.tree.flatten(lower[0])[0])
        return (
            lower,
            self.transform(upper),
            np.full((size,), due),
        )


class Batches(keras.utils.PyDataset):
    """One source's batches, reshuffled per epoch, through `transform`.

    Feeds `keras.Model.fit`, `evaluate` and `predict` with raw arrays that
    the task's preprocessor turns into batches.
    """

    def __init__(self, source, transform):
        super().__init__()
        self.source = source
        self.transform = transform
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self._order = self.source.order(epoch)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return self.transform(self.source.batch(index, self._order))


# Streams: a tf.data.Dataset split without reading it -----------------------


def stream(
    dataset,
    upper_data,
    upper_fraction,
    batch_size,
    upper_batch_size,
    upper_every,
    seed,
    preprocess=None,
):
    """The bi-level `tf.data.Dataset` of `(lower, upper, due)` batches.

    The dataset is split into a lower and an upper stream without being
    read: unit `i` (an element, or a batch when the dataset is batched)
    goes to the upper stream when a seeded rule on `i` says so. With a
    known number of units the rule is `split_indices`' permutation (the
    same split as a `PyDataset`'s); for an endless or unknown-length
    stream it is `uniform(seed, i) < upper_fraction`. The upper stream
    repeats; each of its batches serves `upper_every` lower steps, of
    which the first is due. An epoch is one pass over the lower stream.

    Args:
        dataset: a `tf.data.Dataset` of samples or of batches.
        upper_data: None, or a `tf.data.Dataset` for the upper level.
        upper_fraction: the upper stream's share of the units.
        batch_size: the batch size of an unbatched dataset.
        upper_batch_size: the upper batch size, or None: `batch_size` for
            an unbatched upper stream, the first batch's size for a batched
            one (whose batches are regrouped to that size, so that a short
            last batch wraps around the stream's start).
        upper_every: an upper step every this many lower steps.
        seed: the split's seed.
        preprocess: None, or a function `(x, y, sample_weight) -> batch`
            mapped over both streams' batches (the task's preprocessor).

    Returns:
        A `tf.data.Dataset` for `keras.Model.fit`.
    """
    import tensorflow as tf

    from keras_bidora.training.raw_inputs import is_batched

    lower_units = int(dataset.cardinality())
    if upper_data is None:
        is_upper, lower_units = _upper_rule(dataset, upper_fraction, seed)
        indexed = dataset.enumerate()
        lower = indexed.filter(lambda i, _: tf.logical_not(is_upper(i)))
        upper = indexed.filter(lambda i, _: is_upper(i))
        lower = lower.map(lambda _, element: element)
        upper = upper.map(lambda _, element: element)
    else:
        lower, upper = dataset, upper_data
    if not is_batched(dataset):
        lower = lower.batch(batch_size)
        lower_units = math.ceil(lower_units / batch_size)
    if lower_units >= 0:
        # Keras then knows an epoch's length instead of finding it out by
        # running the stream dry.
        lower = lower.apply(
            tf.data.experimental.assert_cardinality(lower_units)
        )
    if is_batched(dataset if upper_data is None else upper_data):
        upper_batch_size = upper_batch_size or first_batch_size(upper)
    else:
        upper_batch_size = upper_batch_size or batch_size
    upper = regrouped_stream(upper, upper_batch_size)
    if preprocess is not None:
        lower = lower.map(_unpacked(preprocess))
        upper = upper.map(_unpacked(preprocess))
    upper = upper.flat_map(
        lambda *batch: tf.data.Dataset.from_tensors(batch).repeat(upper_every)
    )
    due = tf.data.Dataset.range(2**62).map(lambda i: i % upper_every == 0)

    def with_due(lower_batch, upper_batch, is_due):
        size = tf.shape(tf.nest.flatten(lower_batch)[0])[0]
        return lower_batch, upper_batch, tf.fill([size], is_due)

    combined = tf.data.Dataset.zip((lower, upper, due)).map(with_due)
    if lower_units >= 0:
        # Keras then knows an epoch's length instead of finding it out by
        # running the stream dry.
        combined = combined.apply(
            tf.data.experimental.assert_cardinality(lower_units)
        )
    return combined.prefetch(tf.data.AUTOTUNE)


def first_batch_size(dataset):
    """The samples in the first batch of a `PyDataset` or batched dataset."""
    if isinstance(dataset, keras.utils.PyDataset):
        return _num_samples(_numpy_batch(dataset[0]))
    import tensorflow as tf

    first = tf.nest.flatten(next(iter(dataset.take(1))))[0]
    return int(first.shape[0])


def regrouped_stream(dataset, batch_size):
    """An endless stream of `dataset`'s samples in full batches.

    Batched after repeating, so that a short last batch wraps around the
    stream's start and a compiled step sees one upper batch shape.
    """
    from keras_bidora.training.raw_inputs import is_batched

    if is_batched(dataset):
        dataset = dataset.unbatch()
    return dataset.repeat().batch(batch_size, drop_remainder=True)


def _unpacked(preprocess):
    def apply(*element):
        element = element[0] if len(element) == 1 else element
        return preprocess(*keras.utils.unpack_x_y_sample_weight(element))

    return apply


def _upper_rule(dataset, upper_fraction, seed):
    """`is_upper(i)` for unit `i` and the lower units' count (or -1).

    A known number of units is split by `split_indices`' permutation, an
    unknown or endless one by a seeded hash of `i`.
    """
    import tensorflow as tf

    count = int(dataset.cardinality())
    if count >= 0:
        _, upper = split_indices(count, upper_fraction, seed)
        mask = np.zeros(count, dtype=bool)
        mask[upper] = True
        mask = tf.constant(mask)
        return (lambda i: tf.gather(mask, i)), count - len(upper)
    threshold = tf.constant(upper_fraction, "float32")

    def is_upper(i):
        draw = tf.random.stateless_uniform(
            [], seed=tf.stack([tf.cast(seed, "int64"), i])
        )
        return draw < threshold

    return is_upper, -1
