"""The lower/upper split and the batches the bi-level train step reads."""

import math

import keras
import numpy as np


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


def _pack(x, y, sample_weight):
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
        return _pack(*_take(self.data, indices))


class BatchSource:
    """A list of ready-made batches, visited in a per-epoch seeded order."""

    def __init__(self, batches, shuffle, seed):
        self.batches = batches
        self.shuffle = shuffle
        self.seed = seed

    def __len__(self):
        return len(self.batches)

    def order(self, epoch):
        if not self.shuffle:
            return np.arange(len(self.batches))
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(len(self.batches))

    def batch(self, index, order):
        return self.batches[order[index]]


def materialize_batches(dataset):
    """Reads a `tf.data.Dataset` or `keras.utils.PyDataset` into batches."""
    if isinstance(dataset, keras.utils.PyDataset):
        batches = [dataset[i] for i in range(len(dataset))]
    else:
        batches = list(dataset.as_numpy_iterator())

    def to_numpy(a):
        return None if a is None else keras.ops.convert_to_numpy(a)

    packed = []
    for batch in batches:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        packed.append(
            _pack(
                keras.tree.map_structure(to_numpy, x),
                None if y is None else keras.tree.map_structure(to_numpy, y),
                None if sample_weight is None else to_numpy(sample_weight),
            )
        )
    return packed


def is_dataset(x):
    if isinstance(x, keras.utils.PyDataset):
        return True
    return type(x).__module__.startswith("tensorflow") and hasattr(
        x, "as_numpy_iterator"
    )


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
    """Builds the lower and upper sources from what `fit` received.

    Arrays (and dicts or tuples of arrays) are split by samples: a seeded
    permutation puts `upper_fraction` of them in the upper split. A
    `tf.data.Dataset` or `PyDataset` is read once into its batches, which
    are split the same way, by batches. With `upper_data`, all of `x` is
    lower data.
    """
    upper_batch_size = upper_batch_size or batch_size
    if is_dataset(x):
        if y is not None or sample_weight is not None:
            raise ValueError(
                "When x is a dataset, y and sample_weight must be None: the "
                "dataset yields them. Received: "
                f"y={type(y).__name__}, "
                f"sample_weight={type(sample_weight).__name__}"
            )
        batches = materialize_batches(x)
        if upper_data is None:
            return _split_batches(batches, upper_fraction, shuffle, seed)
        lower = BatchSource(batches, shuffle, seed)
    else:
        if upper_data is None:
            return _split_arrays(
                (x, y, sample_weight),
                upper_fraction,
                batch_size,
                upper_batch_size,
                shuffle,
                seed,
            )
        lower = ArraySource(x, y, sample_weight, batch_size, shuffle, seed)
    upper = upper_source(upper_data, upper_batch_size, shuffle, seed + 1)
    return lower, upper


def _split_batches(batches, upper_fraction, shuffle, seed):
    """A seeded `upper_fraction` of the batches (at least one each side)."""
    if len(batches) < 2:
        raise ValueError(
            "The dataset has fewer than 2 batches, so no batch is "
            "left for the upper split. Pass more data, a smaller "
            "batch size, or `upper_data`. Received: "
            f"{len(batches)} batch(es)"
        )
    order = np.random.default_rng(seed).permutation(len(batches))
    n_upper = min(
        len(batches) - 1, max(1, round(len(batches) * upper_fraction))
    )
    upper = BatchSource(
        [batches[i] for i in sorted(order[:n_upper])], shuffle, seed
    )
    lower = BatchSource(
        [batches[i] for i in sorted(order[n_upper:])], shuffle, seed
    )
    return lower, upper


def _split_arrays(
    data, upper_fraction, batch_size, upper_batch_size, shuffle, seed
):
    """A seeded `upper_fraction` of the samples of `(x, y, sample_weight)`."""
    size = _num_samples(data)
    n_upper = round(size * upper_fraction)
    if n_upper < 1 or n_upper >= size:
        raise ValueError(
            f"upper_fraction={upper_fraction} of {size} training "
            f"samples leaves {n_upper} for the upper split and "
            f"{size - n_upper} for the lower split; both must be "
            "non-empty. Pass more data, another upper_fraction, or "
            "`upper_data`."
        )
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


def upper_source(upper_data, batch_size, shuffle, seed):
    if is_dataset(upper_data):
        batches = materialize_batches(upper_data)
        if not batches:
            raise ValueError("upper_data is an empty dataset.")
        return BatchSource(batches, shuffle, seed)
    if not isinstance(upper_data, (tuple, list)) or len(upper_data) not in (
        2,
        3,
    ):
        raise ValueError(
            "upper_data must be a tuple (x, y) or (x, y, sample_weight), a "
            "tf.data.Dataset or a keras.utils.PyDataset. Received: "
            f"upper_data of type {type(upper_data).__name__}"
        )
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
        tuple(upper_data)
    )
    if _num_samples((x, y, sample_weight)) == 0:
        raise ValueError("upper_data holds no samples.")
    return ArraySource(
        x, y, sample_weight, batch_size, shuffle, seed, full_batches=True
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

    def __init__(self, lower, upper, upper_every):
        super().__init__()
        self.lower = lower
        self.upper = upper
        self.upper_every = upper_every
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
        lower = self.lower.batch(index, self._lower_order)
        # One flag per lower sample: Keras's data adapters want arrays of
        # rank >= 1, and a distribution shards every array along its batch
        # axis.
        size = len(keras.tree.flatten(lower[0])[0])
        return (
            lower,
            self.upper.batch(upper_index, self._upper_order),
            np.full((size,), due),
        )
