"""The fine-tuning recipe: BiDoRA's two phases and the baselines it is
compared with, written once.

`finetune` trains one method on a built KerasHub task (or a function that
builds one) and returns a `FinetuneResult`: the trained and merged models,
per-epoch and per-batch losses, steps, wall time, parameter counts and the
dev outputs. The command line (`keras-bidora train` and `demo`) and the
benchmarks are its clients. `prepare` tokenizes a built-in task's data once
for it, and `predict` is the batched prediction every client scores with.
"""

import dataclasses
import functools
import math
import time

import keras
import numpy as np

from keras_bidora import _keras_compat
from keras_bidora import config
from keras_bidora import saving
from keras_bidora.checks import check_count
from keras_bidora.data import preprocessing
from keras_bidora.injection import inject
from keras_bidora.training import raw_inputs
from keras_bidora.training.model import BiDoRAModel

# The adapter-only file `FinetuneResult.save_adapter` writes: Keras's own
# LoRA file for "keras-lora", `save_adapter_weights`' file otherwise.
ADAPTER_FILE = "adapter.npz"
KERAS_LORA_ADAPTER_FILE = "adapter.lora.h5"
# Variable names of the direction: BiDoRADense's, then Keras LoRA's.
_DIRECTION_NAMES = ("lora_a", "lora_b", "lora_kernel_a", "lora_kernel_b")


class FinetuneResult:
    """What `finetune` returns.

    Attributes:
        method: the method trained, one of `config.METHODS`.
        model: the model that was trained: the `BiDoRAModel` ("dora",
            "bidora") or the adapted task ("lora", "keras-lora").
        merged: the task with the adapters merged into its kernels (plain
            Keras and KerasHub layers), or `None` with `merge=False`.
        history: phase name -> `{log name: [one value per epoch]}`. Phases
            are "bilevel" and "retrain" for "bidora", "train" otherwise.
        batch_loss: phase name -> the training loss of each batch.
        steps: phase name -> the number of training steps.
        best_epochs: phase name -> the epoch (from 1) whose weights early
            stopping restored; empty without early stopping.
        stopping_loss: phase name -> that epoch's loss on the held-out
            part of the training data; empty without early stopping.
        wall_time_s: `{"train": seconds, "per_phase": {phase: seconds}}`.
        parameters: `{"trainable", "magnitude", "direction",
            "head_and_other", "total"}` parameter counts.
        dev_outputs: NumPy outputs on the dev inputs, of the merged model
            (with `merge`) or of the trained model; `None` without dev.
        dev_metrics: `score(dev_outputs)`, or `None` without `score`.
        merge_max_abs_difference: the largest absolute difference between
            the merged and the trained model's dev outputs, or `None`.
        adapter_file_name: the usual name of the adapter-only file,
            `adapter.npz` or, for "keras-lora", `adapter.lora.h5`.
    """

    def __init__(
        self,
        method,
        model,
        recorder,
        train_time,
        parameters,
        merged,
        dev_outputs,
        dev_metrics,
        merge_max_abs_difference,
        save_adapter,
    ):
        self.method = method
        self.model = model
        self.merged = merged
        self.history = {p["phase"]: p["epochs"] for p in recorder.phases}
        self.batch_loss = {p["phase"]: p["batch_loss"] for p in recorder.phases}
        self.steps = {p["phase"]: p["steps"] for p in recorder.phases}
        stopped = [p for p in recorder.phases if "early_stopping" in p]
        self.best_epochs = {
            p["phase"]: p["early_stopping"].best_epoch + 1 for p in stopped
        }
        self.stopping_loss = {
            p["phase"]: float(p["early_stopping"].best) for p in stopped
        }
        self.wall_time_s = {
            "train": train_time,
            "per_phase": {
                p["phase"]: p["wall_time_s"] for p in recorder.phases
            },
        }
        self.parameters = parameters
        self.dev_outputs = dev_outputs
        self.dev_metrics = dev_metrics
        self.merge_max_abs_difference = merge_max_abs_difference
        self.adapter_file_name = (
            KERAS_LORA_ADAPTER_FILE if method == "keras-lora" else ADAPTER_FILE
        )
        self._save_adapter = save_adapter

    def save_adapter(self, path):
        """Writes the adapter-only file (see `adapter_file_name`)."""
        self._save_adapter(path)

    def to_dict(self):
        """The run as JSON-ready data (a fresh copy).

        Keys: `method`, `dev` (`dev_metrics`), `wall_time_s`, `steps`,
        `best_epochs`, `stopping_loss`, `epochs` (`history`), `batch_loss`,
        `parameters` and, when the model was merged,
        `merge_max_abs_difference`.
        """
        result = {
            "method": self.method,
            "dev": self.dev_metrics,
            "wall_time_s": {
                "train": self.wall_time_s["train"],
                "per_phase": dict(self.wall_time_s["per_phase"]),
            },
            "steps": dict(self.steps),
            "best_epochs": dict(self.best_epochs),
            "stopping_loss": dict(self.stopping_loss),
            "epochs": {
                phase: {key: list(values) for key, values in logs.items()}
                for phase, logs in self.history.items()
            },
            "batch_loss": {
                phase: list(losses) for phase, losses in self.batch_loss.items()
            },
            "parameters": dict(self.parameters),
        }
        if self.merged is not None:
            result["merge_max_abs_difference"] = self.merge_max_abs_difference
        return result


def finetune(
    model,
    train,
    dev=None,
    method=config.METHOD,
    *,
    rank=config.RANK,
    alpha=None,
    targets=None,
    dropout=config.DROPOUT,
    hypergradient=config.HYPERGRADIENT,
    upper_fraction=config.UPPER_FRACTION,
    upper_every=config.UPPER_EVERY,
    upper_batch_size=config.UPPER_BATCH_SIZE,
    direction_regularization=config.DIRECTION_REGULARIZATION,
    epochs=config.EPOCHS,
    retrain_epochs=config.RETRAIN_EPOCHS,
    retrain_init=config.RETRAIN_INIT,
    batch_size=config.BATCH_SIZE,
    learning_rate=config.LEARNING_RATE,
    upper_learning_rate=None,
    weight_decay=config.WEIGHT_DECAY,
    loss=None,
    metrics=None,
    seed=config.SEED,
    validation=True,
    merge=True,
    score=None,
    verbose=1,
    callbacks=(),
    early_stopping_patience=None,
    early_stopping_fraction=config.EARLY_STOPPING_FRACTION,
    early_stopping_min_steps=config.EARLY_STOPPING_MIN_STEPS,
    log=print,
):
    """Fine-tunes a KerasHub task with one method's adapters.

    The methods share every setting and differ only in what they train:

    - `"lora"`: low-rank adapters without magnitude
      (`BiDoRADense(magnitude=False)`, the matrix view of PEFT and the
      paper), trained with `keras.Model.fit`.
    - `"keras-lora"`: KerasHub's own `backbone.enable_lora` (per-head
      factors), its scale set to the same `alpha / rank`.
    - `"dora"`: `BiDoRAModel(method="dora")`, magnitude and direction
      trained jointly on all the training data.
    - `"bidora"`: `BiDoRAModel`, a bi-level phase of `epochs` epochs
      (direction and head on the lower split, magnitudes on the upper
      split) and then a retrain phase of `retrain_epochs` epochs (direction
      and head on all the training data, magnitudes frozen).

    Every phase compiles with `keras.optimizers.AdamW(learning_rate,
    weight_decay)` (the magnitudes with `upper_learning_rate`). The dev
    data is Keras's `validation_data` (unless `validation=False`) and is
    predicted once at the end, by the merged model when `merge`.

    With `early_stopping_patience`, a seeded `early_stopping_fraction` of
    the training data is held out (never the dev data): every phase trains
    on the rest, watches its loss on the held-out part (Keras's
    `validation_data`, so `history` holds it as `val_loss`), stops after
    `early_stopping_patience` epochs without improvement and restores the
    weights of its best epoch (`keras.callbacks.EarlyStopping`);
    `epochs` and `retrain_epochs` are then maxima. The dev data is then
    only predicted at the end. On small data an epoch is a few steps, and
    the held-out loss can sit still for several epochs before it falls;
    `early_stopping_min_steps` keeps every phase training for at least that
    many steps (the best epoch is still chosen among all of them).

    Args:
        model: a built `keras.Model` (a KerasHub task, or any model with a
            `backbone` attribute), or a function of no arguments returning
            one. A function is called after `keras.utils.set_random_seed(
            seed)`, so that the run is reproducible; a built model is used
            as it is (seed before building it).
        train: the training data, `(x, y)` or `(x, y, sample_weight)`, as
            arrays or dicts of token arrays.
        dev: `(x, y)`, the dev data, or `None`.
        method: one of `config.METHODS`.
        rank: the adapters' rank.
        alpha: the scale numerator (`s = alpha / rank`); `None` means
            `config.default_alpha(rank)`, `2 * rank`.
        targets: the layers to adapt (see `keras_bidora.inject`); `None`
            adapts the attention's query and value projections.
        dropout: dropout on the adapters' input (not with "keras-lora").
        hypergradient: the magnitudes' hypergradient ("bidora"), one of
            `config.HYPERGRADIENTS`.
        upper_fraction: the share of the training data held out for the
            magnitudes ("bidora").
        upper_every: one magnitude step every this many direction steps
            ("bidora").
        upper_batch_size: the magnitudes' batch size ("bidora"): a
            positive integer, `None` (`batch_size`) or `"proportional"`
            (`batch_size * upper_fraction / (1 - upper_fraction)`, rounded,
            at least 1: 8 at 32 and 0.2), see `BiDoRAModel`.
        direction_regularization: the orthogonality penalty's coefficient
            ("dora", "bidora").
        epochs: epochs of training (of the bi-level phase for "bidora").
        retrain_epochs: epochs of the retrain phase ("bidora"); 0 skips it.
        retrain_init: one of `config.RETRAIN_INITS`: the retrain phase
            starts from the learned direction ("continue") or from a fresh
            one ("reinitialize").
        batch_size: the batch size of training and prediction.
        learning_rate: AdamW's learning rate (direction and head).
        upper_learning_rate: the magnitudes' learning rate ("bidora");
            defaults to `learning_rate`.
        weight_decay: AdamW's weight decay.
        loss: the loss, as for `keras.Model.compile` (required).
        metrics: compiled metrics, or `None`.
        seed: seeds the model's build (when `model` is a function), the
            lower/upper split and the shuffles.
        validation: evaluate the dev data at the end of each epoch.
        merge: also build the merged model (`keras_bidora.merge`, or for
            "keras-lora" a copy without Keras's LoRA).
        score: a function of the dev outputs returning a dict of metrics.
        verbose: `fit`'s verbosity.
        callbacks: Keras callbacks added to every phase's `fit`.
        early_stopping_patience: `None` (train every epoch), or a positive
            integer: stop a phase after this many epochs without a lower
            loss on the held-out part of the training data, and restore
            its best epoch's weights.
        early_stopping_fraction: the share of the training data held out
            for early stopping, in (0, 1); seeded by `seed`.
        early_stopping_min_steps: with `early_stopping_patience`, no phase
            stops early before it has trained this many steps (batches of
            `fit`; BiDoRA's bi-level phase counts its direction steps).
        log: a function of one string for progress lines (`None`: silent).

    Returns:
        A `FinetuneResult`.

    Raises:
        ValueError: for an unknown `method` or `retrain_init`, a missing
            `loss`, `dropout` with "keras-lora", `targets` matching no
            layer, `epochs` below 1 or `retrain_epochs` below 0 (or not
            integers), an invalid adapter or early-stopping setting.

    Example:

    >>> import keras, keras_hub, numpy as np
    >>> from keras_bidora import recipes
    >>> def build():
    ...     backbone = keras_hub.models.BertBackbone(
    ...         vocabulary_size=100, num_layers=2, num_heads=2,
    ...         hidden_dim=16, intermediate_dim=32, max_sequence_length=16)
    ...     return keras_hub.models.BertTextClassifier(
    ...         backbone, num_classes=2, preprocessor=None)
    >>> x = {"token_ids": np.random.randint(1, 100, (32, 16)),
    ...      "segment_ids": np.zeros((32, 16), "int32"),
    ...      "padding_mask": np.ones((32, 16), "bool")}
    >>> y = np.random.randint(0, 2, (32,))
    >>> result = recipes.finetune(
    ...     build, (x, y), (x, y), "bidora", rank=4, epochs=1,
    ...     batch_size=8, verbose=0, log=None,
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> sorted(result.steps)
    ['bilevel', 'retrain']

    Reference:
        - [Qin et al., 2024. BiDoRA: Bi-level Optimization-Based
          Weight-Decomposed Low-Rank Adaptation](
          https://arxiv.org/abs/2410.09758)
    """
    _check_arguments(method, retrain_init, loss, dropout)
    _check_raw_inputs(method, train)
    _check_min_steps(early_stopping_min_steps, early_stopping_patience)
    check_count("epochs", epochs, 1)
    check_count("retrain_epochs", retrain_epochs, 0)
    stopping = None
    if early_stopping_patience is not None:
        train, stopping = hold_out(
            train, early_stopping_fraction, seed, early_stopping_patience
        )
    log = log or (lambda message: None)
    if not isinstance(model, keras.Model):
        keras.utils.set_random_seed(seed)
        model = model()
    settings = _Settings(
        method=method,
        rank=rank,
        alpha=config.default_alpha(rank) if alpha is None else alpha,
        targets=list(targets) if targets else None,
        dropout=dropout,
        hypergradient=hypergradient,
        upper_fraction=upper_fraction,
        upper_every=upper_every,
        upper_batch_size=upper_batch_size,
        direction_regularization=direction_regularization,
        epochs=epochs,
        retrain_epochs=retrain_epochs,
        retrain_init=retrain_init,
        learning_rate=learning_rate,
        upper_learning_rate=upper_learning_rate or learning_rate,
        weight_decay=weight_decay,
        seed=seed,
    )
    trained = _adapt(model, settings)
    parameters = parameter_counts(model, trained.trainable_weights)
    log(
        f"[{method}] trainable parameters: {parameters['trainable']:,} of "
        f"{parameters['total']:,} (magnitude {parameters['magnitude']:,}, "
        f"direction {parameters['direction']:,}, head and other "
        f"{parameters['head_and_other']:,})"
    )
    x, y, *sample_weight = train
    if stopping is None and validation and dev is not None:
        stopping = tuple(dev)
    fit_kwargs = dict(
        batch_size=batch_size,
        validation_data=stopping,
        verbose=verbose,
        **({"sample_weight": sample_weight[0]} if sample_weight else {}),
    )
    compile_kwargs = {"loss": loss}
    if metrics is not None:
        compile_kwargs["metrics"] = metrics
    recorder = _Recorder(
        callbacks, early_stopping_patience, early_stopping_min_steps
    )
    start = time.perf_counter()
    if method == "bidora":
        _train_bilevel(
            trained, x, y, settings, compile_kwargs, fit_kwargs, recorder, log
        )
    else:
        _train_one_phase(
            trained, model, x, y, settings, compile_kwargs, fit_kwargs, recorder
        )
    train_time = time.perf_counter() - start
    # A generative task is scored by what it generates (`complete`), not
    # by its logits over the whole dev set.
    predicted = None if raw_inputs.is_generative(model) else dev
    result = _finish(
        model, trained, predicted, batch_size, merge, score, settings
    )
    return FinetuneResult(
        method, trained, recorder, train_time, parameters, *result
    )


def hold_out(train, fraction, seed, patience=1):
    """Splits `train` into the part to fit and the part early stopping
    watches.

    A seeded permutation holds out `held_out_count(n, fraction)` of the
    `n` examples, in their original order.

    Args:
        train: `(x, y)` or `(x, y, sample_weight)`, each an array, a list,
            or a dict or tuple of them (e.g. token-id dicts, raw strings,
            sentence pairs), with one row per example; `y` may be `None`.
        fraction: the share held out, in (0, 1).
        seed: seeds the permutation.
        patience: `finetune`'s `early_stopping_patience`, checked here.

    Returns:
        `(fitted, held_out)`, each a tuple of the same structure.

    Raises:
        ValueError: for a `fraction` outside (0, 1), a `patience` that is
            not a positive integer, data that cannot be indexed by example
            (a `tf.data.Dataset`, a `PyDataset`), or fewer than 2 examples.

    Example:

    >>> import numpy as np
    >>> from keras_bidora import recipes
    >>> fitted, held_out = recipes.hold_out(
    ...     (np.arange(10), np.arange(10) % 2), 0.2, seed=0)
    >>> len(fitted[0]), len(held_out[0])
    (8, 2)
    """
    check_count("early_stopping_patience", patience, 1)
    if not 0 < fraction < 1:
        raise ValueError(
            "early_stopping_fraction must be in (0, 1). Received: "
            f"early_stopping_fraction={fraction!r}"
        )
    leaves = [leaf for leaf in _leaves(train) if leaf is not None]
    if not leaves or not all(hasattr(leaf, "__getitem__") for leaf in leaves):
        kinds = ", ".join(sorted({type(leaf).__name__ for leaf in leaves}))
        raise ValueError(
            "Early stopping holds out examples of arrays, lists or dicts "
            "of them; split a dataset yourself and pass it as validation "
            f"data instead. Received: training data of type(s) {kinds}"
        )
    count = len(leaves[0])
    if count < 2:
        raise ValueError(
            "Early stopping needs at least 2 training examples to hold one "
            f"out. Received: {count} example(s)"
        )
    held = held_out_count(count, fraction)
    order = np.random.default_rng(seed).permutation(count)
    held_out = np.sort(order[:held])
    fitted = np.sort(order[held:])

    return _rows(tuple(train), fitted), _rows(tuple(train), held_out)


def held_out_count(count, fraction):
    """How many of `count` examples `hold_out` holds out: `round(fraction *
    count)`, at least one and at most `count - 1`.

    Example:

    >>> from keras_bidora import recipes
    >>> recipes.held_out_count(100, 0.1), recipes.held_out_count(5, 0.1)
    (10, 1)
    """
    return min(count - 1, max(1, round(fraction * count)))


def _leaves(data):
    """The per-example arrays of `data`: dicts and tuples are structure
    (token-id dicts, sentence pairs, `(x, y)`); a list is one array (of
    strings, say)."""
    if isinstance(data, dict):
        return [leaf for value in data.values() for leaf in _leaves(value)]
    if isinstance(data, tuple):
        return [leaf for value in data for leaf in _leaves(value)]
    return [data]


def _rows(data, indices):
    """`data` (as `_leaves` reads it) at the example `indices`."""
    if isinstance(data, dict):
        return {key: _rows(value, indices) for key, value in data.items()}
    if isinstance(data, tuple):
        return tuple(_rows(value, indices) for value in data)
    if data is None:
        return None
    if isinstance(data, list):
        data = np.asarray(data)
    return data[indices]


def _check_arguments(method, retrain_init, loss, dropout):
    if method not in config.METHODS:
        raise ValueError(
            f"method must be one of {', '.join(config.METHODS)}. "
            f"Received: method={method!r}"
        )
    if retrain_init not in config.RETRAIN_INITS:
        raise ValueError(
            f"retrain_init must be one of {', '.join(config.RETRAIN_INITS)}. "
            f"Received: retrain_init={retrain_init!r}"
        )
    if loss is None:
        raise ValueError(
            "finetune needs a loss, as keras.Model.compile takes it. "
            "Received: loss=None"
        )
    if method == "keras-lora" and dropout:
        raise ValueError(
            "dropout is not supported by method='keras-lora' (KerasHub's "
            f"LoRA has no adapter dropout). Received: dropout={dropout}"
        )


def _check_min_steps(min_steps, patience):
    check_count("early_stopping_min_steps", min_steps, 0)
    if min_steps and patience is None:
        raise ValueError(
            "early_stopping_min_steps needs early_stopping_patience (early "
            f"stopping is off). Received: early_stopping_min_steps="
            f"{min_steps!r}, early_stopping_patience=None"
        )


def _check_raw_inputs(method, train):
    if method in config.MODEL_METHODS or not raw_inputs.is_raw(train[0]):
        return
    raise ValueError(
        f"Raw text trains with method 'dora' or 'bidora' (BiDoRAModel "
        f"applies the task's preprocessor); method={method!r} trains on "
        "token arrays. Received: raw text with method="
        f"{method!r}"
    )


@dataclasses.dataclass
class _Settings:
    """`finetune`'s adapter and optimisation settings, resolved."""

    method: str
    rank: int
    alpha: float
    targets: list
    dropout: float
    hypergradient: str
    upper_fraction: float
    upper_every: int
    upper_batch_size: object
    direction_regularization: float
    epochs: int
    retrain_epochs: int
    retrain_init: str
    learning_rate: float
    upper_learning_rate: float
    weight_decay: float
    seed: int

    def adapter_kwargs(self):
        return dict(
            rank=self.rank,
            alpha=self.alpha,
            targets=self.targets,
            dropout=self.dropout,
        )

    def optimizer(self, learning_rate):
        return keras.optimizers.AdamW(
            learning_rate=learning_rate, weight_decay=self.weight_decay
        )


def _adapt(model, settings):
    """Gives `model` the method's adapters; returns the model to train."""
    if settings.method == "keras-lora":
        _enable_keras_lora(model.backbone, **settings.adapter_kwargs())
        return model
    if settings.method == "lora":
        inject(model, magnitude=False, **settings.adapter_kwargs())
        return model
    return BiDoRAModel(
        model,
        upper_fraction=settings.upper_fraction,
        hypergradient=settings.hypergradient,
        upper_every=settings.upper_every,
        upper_batch_size=settings.upper_batch_size,
        direction_regularization=settings.direction_regularization,
        method="dora" if settings.method == "dora" else "bidora",
        seed=settings.seed,
        **settings.adapter_kwargs(),
    )


def _enable_keras_lora(backbone, rank, alpha, targets, dropout):
    names = targets or backbone.default_lora_layer_names()
    backbone.enable_lora(rank, target_layer_names=names)
    enabled = [
        layer
        for layer in _all_layers(backbone)
        if getattr(layer, "lora_enabled", False)
    ]
    if not enabled:
        raise ValueError(
            f"targets {' '.join(names)} match no layer of the backbone. "
            f"Received: targets={targets!r}"
        )
    # KerasHub's enable_lora takes no alpha (it leaves alpha = rank); set
    # Keras's public `lora_alpha` so that every method scales its update by
    # the same alpha / rank.
    for layer in enabled:
        layer.lora_alpha = alpha


def _train_one_phase(
    trained, model, x, y, settings, compile_kwargs, fit_kwargs, recorder
):
    """ "lora", "keras-lora" and "dora": one phase named "train"."""
    trained.compile(
        optimizer=settings.optimizer(settings.learning_rate), **compile_kwargs
    )
    if trained is model:
        # A KerasHub task's own `fit` batches arrays into a tf.data
        # pipeline that ignores `shuffle`; `keras.Model.fit` shuffles.
        fit = functools.partial(keras.Model.fit, model)
    else:
        fit = trained.fit  # dora: `BiDoRAModel.fit`
    fit(
        x,
        y,
        epochs=settings.epochs,
        shuffle=True,
        callbacks=recorder.callbacks("train"),
        **fit_kwargs,
    )


def _train_bilevel(
    trained, x, y, settings, compile_kwargs, fit_kwargs, recorder, log
):
    """ "bidora": the bi-level phase, then the retrain phase."""
    method = settings.method
    trained.compile(
        optimizer=settings.optimizer(settings.learning_rate),
        upper_optimizer=settings.optimizer(settings.upper_learning_rate),
        **compile_kwargs,
    )
    log(f"[{method}] phase 1: bi-level, {settings.epochs} epoch(s)")
    trained.fit(
        x,
        y,
        epochs=settings.epochs,
        callbacks=recorder.callbacks("bilevel"),
        **fit_kwargs,
    )
    if settings.retrain_epochs > 0:
        log(
            f"[{method}] phase 2: retrain ({settings.retrain_init} the "
            f"direction), {settings.retrain_epochs} epoch(s)"
        )
        trained.retrain(
            x,
            y,
            epochs=settings.retrain_epochs,
            reinitialize_direction=settings.retrain_init == "reinitialize",
            callbacks=recorder.callbacks("retrain"),
            **fit_kwargs,
        )


def _finish(model, trained, dev, batch_size, merge, score, settings):
    """Predicts dev, merges and scores: `(merged, dev_outputs, dev_metrics,
    merge_max_abs_difference, save_adapter)`."""
    outputs = merged = difference = None
    if dev is not None:
        outputs = np.asarray(predict(trained, dev[0], batch_size))
    if settings.method == "keras-lora":

        def save_adapter(path):
            model.backbone.save_lora_weights(path)

    else:

        def save_adapter(path):
            saving.save_adapter_weights(trained, path)

    if merge:
        if settings.method == "keras-lora":
            merged = _merge_keras_lora(model)
        else:
            merged = saving.merge(trained)
        if dev is not None:
            merged_outputs = np.asarray(predict(merged, dev[0], batch_size))
            difference = float(np.max(np.abs(merged_outputs - outputs)))
            outputs = merged_outputs
    metrics = score(outputs) if score is not None else None
    return merged, outputs, metrics, difference, save_adapter


def predict(model, x, batch_size=config.EVALUATION_BATCH_SIZE):
    """The model's outputs on `x` as NumPy, in batches, silently.

    Calls `keras.Model.predict` itself: KerasHub tasks route arrays through
    a tf.data pipeline that is not needed without a preprocessor.

    Args:
        model: a `keras.Model` (a task, a `BiDoRAModel`, a merged task).
        x: its inputs (arrays or a dict of token arrays).
        batch_size: examples per prediction batch.

    Returns:
        The outputs, as `keras.Model.predict` returns them.

    Example:

    >>> import keras, numpy as np
    >>> from keras_bidora import recipes
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> recipes.predict(model, np.zeros((5, 3)), batch_size=2).shape
    (5, 2)
    """
    return keras.Model.predict(model, x, batch_size=batch_size, verbose=0)


def complete(
    model, prompts, max_length=None, batch_size=config.EVALUATION_BATCH_SIZE
):
    """What a generative task writes after each prompt, in batches.

    Args:
        model: a `CausalLM` (a merged task) or a `BiDoRAModel` wrapping one.
        prompts: a list of prompt strings.
        max_length: prompt and completion tokens together; `None` means the
            preprocessor's `sequence_length`, as in `CausalLM.generate`.
        batch_size: prompts per `generate` call.

    Returns:
        A list of strings: each generated text without its prompt, stripped.

    Example:

    >>> class Echo:  # any object with a CausalLM's `generate`
    ...     def generate(self, prompts, max_length=None):
    ...         return [prompt + " ok " for prompt in prompts]
    >>> from keras_bidora import recipes
    >>> recipes.complete(Echo(), ["a =>", "b =>"], batch_size=1)
    ['ok', 'ok']
    """
    completions = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        texts = model.generate(batch, max_length=max_length)
        completions += [
            _completion(prompt, text) for prompt, text in zip(batch, texts)
        ]
    return completions


def _completion(prompt, text):
    # The detokenized prompt can differ from the prompt (characters the
    # vocabulary lacks, normalised spaces); then cut at its last word.
    if text.startswith(prompt):
        return text[len(prompt) :].strip()
    words = prompt.split()
    marker = words[-1] if words else ""
    return text.partition(marker)[2].strip() if marker in text else text


# Parameter counts and recording ----------------------------------------


def parameter_counts(model, trainable_variables):
    """Counts a run's parameters by kind.

    Args:
        model: the adapted task (all its weights make the total).
        trainable_variables: the variables the run trains.

    Returns:
        A dict: `trainable` (all trained), `magnitude`, `direction` (the
        low-rank factors), `head_and_other` and `total`.

    Example:

    >>> import keras
    >>> from keras_bidora import recipes
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> recipes.parameter_counts(model, model.trainable_weights)["trainable"]
    8
    """
    counts = {"magnitude": 0, "direction": 0, "head_and_other": 0}
    for variable in trainable_variables:
        name = variable.path.rsplit("/", 1)[-1]
        if name == "magnitude":
            kind = "magnitude"
        elif name in _DIRECTION_NAMES:
            kind = "direction"
        else:
            kind = "head_and_other"
        counts[kind] += math.prod(variable.shape)
    return {
        "trainable": int(sum(counts.values())),
        **{kind: int(count) for kind, count in counts.items()},
        "total": int(sum(math.prod(v.shape) for v in model.weights)),
    }


class _Recorder:
    """Collects losses per batch and per epoch, steps and wall time across
    the phases of a run."""

    def __init__(
        self,
        callbacks,
        early_stopping_patience=None,
        early_stopping_min_steps=config.EARLY_STOPPING_MIN_STEPS,
    ):
        self.phases = []
        self.extra_callbacks = list(callbacks)
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_min_steps = early_stopping_min_steps

    def callbacks(self, phase):
        """A phase's `fit` callbacks: its recorder, the caller's, then early
        stopping (which restores the best epoch's weights at the end)."""
        record = {
            "phase": phase,
            "batch_loss": [],
            "epochs": {},
            "steps": 0,
            "wall_time_s": 0.0,
        }
        self.phases.append(record)
        callbacks = [_RecordingCallback(record), *self.extra_callbacks]
        if self.early_stopping_patience is not None:
            record["early_stopping"] = MinStepsEarlyStopping(
                self.early_stopping_min_steps,
                monitor="val_loss",
                patience=self.early_stopping_patience,
                restore_best_weights=True,
            )
            callbacks.append(record["early_stopping"])
        return callbacks


class MinStepsEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's `EarlyStopping` that does not stop before `min_steps`
    training steps.

    Unlike `start_from_epoch`, every epoch is watched from the first: the
    best epoch (the one restored) is chosen among all of them, and once
    `min_steps` steps have run, training stops as soon as the best epoch is
    `patience` epochs old. A stop asked by another callback is left alone.

    Args:
        min_steps: the training steps (batches) before stopping may begin.
        **kwargs: `keras.callbacks.EarlyStopping`'s arguments.

    Example:

    >>> import keras, numpy as np
    >>> from keras_bidora.recipes import MinStepsEarlyStopping
    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    >>> model.compile(keras.optimizers.SGD(0.0), "mse")  # loss never falls
    >>> x, y = np.ones((4, 1)), np.zeros((4, 1))
    >>> history = model.fit(x, y, validation_data=(x, y), batch_size=2,
    ...     epochs=10, verbose=0, callbacks=[MinStepsEarlyStopping(
    ...         min_steps=8, patience=1)])
    >>> len(history.history["loss"])  # 4 epochs of 2 steps
    4
    """

    def __init__(self, min_steps, **kwargs):
        super().__init__(**kwargs)
        self.min_steps = min_steps
        self.steps = 0

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1

    def on_epoch_end(self, epoch, logs=None):
        stopping = self.model.stop_training
        super().on_epoch_end(epoch, logs)
        if (
            not stopping
            and self.model.stop_training
            and self.steps < self.min_steps
        ):
            self.model.stop_training = False
            self.stopped_epoch = 0


class _RecordingCallback(keras.callbacks.Callback):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.previous = 0.0

    def on_train_batch_end(self, batch, logs=None):
        self.record["steps"] += 1
        if not logs or "loss" not in logs:
            return
        # Keras logs the running mean over the epoch; recover this batch's
        # loss from it (batches weigh equally but the last).
        total = float(np.asarray(logs["loss"])) * (batch + 1)
        self.record["batch_loss"].append(total - self.previous)
        self.previous = total

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.record["epochs"].setdefault(key, []).append(
                float(np.asarray(value))
            )

    def on_train_end(self, logs=None):
        self.record["wall_time_s"] += time.perf_counter() - self.start


# Merging Keras's LoRA ---------------------------------------------------


def _merge_keras_lora(model):
    """A copy of `model` without Keras's LoRA, its updates merged in."""
    # Keras has no call to turn LoRA off; rebuild the model from its config
    # without the LoRA settings and copy the weights across, a LoRA layer's
    # `kernel` (which Keras returns merged) in place of its frozen kernel.
    config_ = keras.saving.serialize_keras_object(model)
    clone = keras.saving.deserialize_keras_object(_without_lora(config_))
    lora_kernels = {}
    for layer in _all_layers(model):
        if getattr(layer, "lora_enabled", False):
            for variable in layer.weights:
                if variable.path.endswith("/kernel"):
                    lora_kernels[id(variable)] = layer.kernel
    values = [
        lora_kernels.get(id(variable), variable)
        for variable in model.weights
        if not variable.path.rsplit("/", 1)[-1].startswith("lora_kernel_")
    ]
    if len(values) != len(clone.weights):
        raise RuntimeError(
            "Merging Keras LoRA: the rebuilt model has "
            f"{len(clone.weights)} weights, the trained one {len(values)}"
        )
    for target, value in zip(clone.weights, values):
        value = keras.ops.convert_to_numpy(value)
        if tuple(target.shape) != value.shape:
            raise RuntimeError(
                f"Merging Keras LoRA: {target.path} has shape "
                f"{tuple(target.shape)}, the trained weight {value.shape}"
            )
        target.assign(value)
    return clone


def _without_lora(value):
    if isinstance(value, dict):
        return {
            k: _without_lora(v)
            for k, v in value.items()
            if k not in ("lora_rank", "lora_alpha", "compile_config")
        }
    if isinstance(value, list):
        return [_without_lora(v) for v in value]
    return value


def _all_layers(model):
    return _keras_compat.flatten_layers(model)


# Data -------------------------------------------------------------------


class Prepared:
    """A task's train and dev data, tokenized once as NumPy arrays.

    Attributes:
        encoder: the `keras_bidora.data.Encoder` that tokenized them.
        x_train, y_train: the training inputs (a dict of token arrays) and
            targets.
        x_dev, y_dev: the dev inputs and targets.
        dev: the dev `TaskData` (its texts and labels score predictions).
    """

    def __init__(self, encoder, train, dev):
        self.encoder = encoder
        self.dev = dev
        self.x_train, self.y_train = encoder.encode(train.texts, train.labels)
        self.x_dev, self.y_dev = encoder.encode(dev.texts, dev.labels)

    @property
    def spec(self):
        """The task's `TaskSpec`."""
        return self.encoder.spec

    def score(self, outputs):
        """The task's metrics (`TaskSpec.score`) of dev outputs."""
        predictions = self.encoder.decode(outputs, self.dev.texts)
        return self.spec.score(self.dev.labels, predictions)


def prepare(spec, preset, train, dev, sequence_length=None, log=print):
    """Tokenizes a task's train and dev data once, for `finetune`.

    Args:
        spec: the task's `keras_bidora.data.TaskSpec`.
        preset: a KerasHub preset name or folder (its tokenizer is used).
        train: the training `TaskData` (e.g. from `data.load_task`).
        dev: the dev `TaskData`.
        sequence_length: tokens per example; defaults to
            `config.sequence_length(spec.name)`.
        log: a function of one string for a progress line (`None`: silent).

    Returns:
        A `Prepared`.

    Example:

    ```python
    from keras_bidora import data, recipes
    train = data.load_task("sst2", "train", limit=64)
    dev = data.load_task("sst2", "dev", limit=32)
    preset = data.resolve_preset(None)
    prepared = recipes.prepare(train.spec, preset, train, dev)
    result = recipes.finetune(
        lambda: data.build_model(train.spec, preset)[0],
        (prepared.x_train, prepared.y_train),
        (prepared.x_dev, prepared.y_dev),
        score=prepared.score,
        **recipes.compile_arguments(train.spec),
    )
    ```
    """
    sequence_length = sequence_length or config.sequence_length(spec.name)
    start = time.perf_counter()
    encoder = preprocessing.Encoder(spec, preset, sequence_length)
    prepared = Prepared(encoder, train, dev)
    if log is not None:
        log(
            f"Tokenized {len(train)} train and {len(dev)} dev examples to "
            f"{sequence_length} tokens in {time.perf_counter() - start:.1f}s"
        )
    return prepared


def compile_arguments(spec):
    """`finetune`'s `loss` (and `metrics`) for a task's kind.

    Args:
        spec: a `keras_bidora.data.TaskSpec`.

    Returns:
        `{"loss": ..., "metrics": [...]}`: mean squared error for
        regression, sparse categorical cross-entropy on logits otherwise
        (ignoring the `IGNORE` tags of token classification); accuracy
        for classification, no metric otherwise.

    Example:

    >>> from keras_bidora import recipes
    >>> from keras_bidora.data import get_task_spec
    >>> sorted(recipes.compile_arguments(get_task_spec("sst2")))
    ['loss', 'metrics']
    """
    # An explicit empty list: KerasHub's `TextClassifier.compile` adds
    # sparse categorical accuracy when given no metrics, which means
    # nothing for regression.
    if spec.kind == "regression":
        return {"loss": keras.losses.MeanSquaredError(), "metrics": []}
    if spec.kind == "token_classification":
        return {
            "loss": keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, ignore_class=preprocessing.IGNORE
            ),
            "metrics": [],
        }
    return {
        "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "metrics": [keras.metrics.SparseCategoricalAccuracy("accuracy")],
    }
