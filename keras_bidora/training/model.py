"""BiDoRAModel: a saveable wrapper whose train step alternates two levels."""

import math
import types

import keras
import numpy as np
from keras import ops

from keras_bidora import _keras_compat
from keras_bidora import config
from keras_bidora.checks import check_count
from keras_bidora.distribution import distribute_adapters
from keras_bidora.injection import inject
from keras_bidora.injection import injection_config
from keras_bidora.injection import is_injected
from keras_bidora.injection import quantize_layers
from keras_bidora.injection import quantized_layers
from keras_bidora.layers.bidora_dense import adapted_layers
from keras_bidora.layers.bidora_dense import check_quantization_mode
from keras_bidora.layers.bidora_dense import shared_column_scales
from keras_bidora.saving import merge
from keras_bidora.training import backend as backend_lib
from keras_bidora.training import bilevel_dataset
from keras_bidora.training import hypergradients
from keras_bidora.training import inputs
from keras_bidora.training import raw_inputs
from keras_bidora.training.partition import Partition
from keras_bidora.training.step import STEPS


class _NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops `fit` with a clear error when a level's loss is not finite.

    The train step itself skips the update of a step whose loss is not
    finite, so the weights stay those of the last good step.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        for key, level in (("loss", "lower"), ("upper_loss", "upper")):
            if logs is None or key not in logs:
                continue
            value = float(ops.convert_to_numpy(logs[key]))
            if not math.isfinite(value):
                if hasattr(self.model, "jax_state_sync"):
                    self.model.jax_state_sync()
                raise FloatingPointError(
                    f"The {level}-level loss became {value} at epoch "
                    f"{getattr(self, 'epoch', 0) + 1}, step {batch + 1}. "
                    "Training stopped; the weights (and optimizer states) "
                    "are those of the last step with a finite loss. Lower "
                    "the learning rate(s) or check the data."
                )


class _OnTrainBegin(keras.callbacks.Callback):
    """Calls `fn()` as training begins, after `fit` has read its data."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def on_train_begin(self, logs=None):
        self.fn()


class _EpochSetter(keras.callbacks.Callback):
    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def on_epoch_begin(self, epoch, logs=None):
        self.dataset.set_epoch(epoch)


@keras.saving.register_keras_serializable(package="keras_bidora")
class BiDoRAModel(keras.Model):
    """Wraps a model, injects BiDoRA adapters, and trains them bi-level.

    `BiDoRAModel(model)` adapts `model` (a KerasHub backbone or task, or any
    built Keras model) with `keras_bidora.inject` unless it is already
    adapted, and calls it in its forward pass. Its config records the wrapped
    model's config and the injection settings, so `.keras` files reload into
    the same adapted structure, with both optimizers' states.

    Training (`fit`) alternates two levels, each with its own optimizer:

    - lower level, every step: the direction (each adapter's `lora_a`,
      `lora_b`) and every other trainable variable (e.g. a task head) take a
      step of `optimizer` on a lower batch, on the task loss plus
      `direction_regularization` times the orthogonality penalty; the
      magnitudes are fixed.
    - upper level, every `upper_every` steps: the magnitudes take a step of
      `upper_optimizer` on an upper batch, along the hypergradient chosen by
      `hypergradient` (`"first_order"`, `"darts"`, `"darts_forward"` or
      `"neumann"`, see `keras_bidora.training.hypergradients`), computed at
      the same direction as the lower gradient, which it reuses
      (`"darts_forward"` also reuses the lower loss's gradient in the
      magnitudes, taken in the lower step's backward pass but never
      applied by `optimizer`).

    `fit` splits its training data, seeded, into a lower split
    (`1 - upper_fraction`) and an upper split, unless `upper_data` is given.
    `retrain` then trains the direction and the head on all the data with
    the magnitudes frozen. `method="dora"` trains magnitude and direction
    jointly on all the data instead (plain DoRA, for comparisons).

    A step whose loss is not finite is not applied, and `fit` stops with an
    error naming the level and step.

    Args:
        model: a built Keras model (KerasHub backbone or task).
        rank: rank of the direction updates.
        alpha: scale numerator (`s = alpha / rank`); defaults to `2 * rank`.
        targets: which layers to adapt; see `keras_bidora.inject`.
        dropout: dropout on the adapters' input.
        upper_fraction: fraction of the training data held out for the
            upper level, in (0, 1).
        hypergradient: `"first_order"` (the default: as accurate as
            `"darts"` in the benchmarks, at about half its cost),
            `"darts"` (the paper's, a central finite difference),
            `"darts_forward"` (a one-sided difference: one pass fewer per
            upper step, O(eps) error) or `"neumann"`.
        upper_every: an upper step every this many lower steps.
        upper_batch_size: batch size of the upper level: a positive
            integer, None (fit's `batch_size`, or a dataset's first batch's
            size) or `"proportional"`, batches in the ratio of the two
            splits' sizes: `max(1, round(batch_size * upper_fraction /
            (1 - upper_fraction)))` samples (8 at 32 and 0.2), so that an
            epoch at `upper_every=1` reads the upper split about once
            instead of `(1 - upper_fraction) / upper_fraction` times. With
            `upper_data` given, `"proportional"` still takes
            `upper_fraction`'s ratio.
        direction_regularization: coefficient of the orthogonality penalty
            in the lower loss (the paper: 1e-5 or 0).
        neumann_terms: number of Neumann terms for `hypergradient="neumann"`.
        method: `"bidora"` (bi-level) or `"dora"` (joint).
        seed: seed of the lower/upper split and of the per-epoch shuffles.
        **layer_kwargs: passed to each `BiDoRADense` (`detach_norm`, ...).

    Example:

    >>> import numpy as np
    >>> import keras
    >>> import keras_bidora
    >>> inputs = keras.Input((8,))
    >>> hidden = keras.layers.Dense(8, name="query")(inputs)
    >>> base = keras.Model(inputs, keras.layers.Dense(1, name="head")(hidden))
    >>> model = keras_bidora.BiDoRAModel(base, rank=2, targets=["query"])
    >>> model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="mse")
    >>> x, y = np.random.rand(40, 8), np.random.rand(40, 1)
    >>> history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    >>> sorted(history.history)
    ['loss', 'upper_loss']

    Reference:
        - [Qin et al., 2024. BiDoRA: Bi-level Optimization-Based
          Weight-Decomposed Low-Rank Adaptation](
          https://arxiv.org/abs/2410.09758)
    """

    def __init__(
        self,
        model,
        rank=config.RANK,
        alpha=None,
        targets=None,
        dropout=config.DROPOUT,
        upper_fraction=config.UPPER_FRACTION,
        hypergradient=config.HYPERGRADIENT,
        upper_every=config.UPPER_EVERY,
        upper_batch_size=config.UPPER_BATCH_SIZE,
        direction_regularization=config.DIRECTION_REGULARIZATION,
        neumann_terms=config.NEUMANN_TERMS,
        method=config.METHOD,
        seed=None,
        **kwargs,
    ):
        base_kwargs = {
            key: kwargs.pop(key)
            for key in ("name", "trainable", "dtype")
            if key in kwargs
        }
        if not isinstance(model, keras.Model):
            raise ValueError(
                "BiDoRAModel wraps a keras.Model (a KerasHub backbone or "
                f"task). Received: model={model!r}"
            )
        rank = check_count("rank", rank, 1)
        upper_every = check_count("upper_every", upper_every, 1)
        neumann_terms = check_count("neumann_terms", neumann_terms, 0)
        upper_batch_size = _checked_upper_batch_size(upper_batch_size)
        _check_arguments(
            upper_fraction=upper_fraction,
            hypergradient=hypergradient,
            direction_regularization=direction_regularization,
            method=method,
        )
        if not adapted_layers(model):
            inject(
                model,
                rank=rank,
                alpha=alpha,
                targets=targets,
                dropout=dropout,
                **kwargs,
            )
        # Under a keras.distribution (JAX), the adapters are laid out like
        # their kernels.
        distribute_adapters(model)
        super().__init__(**base_kwargs)
        self.model = model
        self.rank = rank
        self.alpha = alpha
        self.targets = targets
        self.dropout = dropout
        self.layer_kwargs = kwargs
        self.upper_fraction = upper_fraction
        self.hypergradient = hypergradient
        self.upper_every = upper_every
        self.upper_batch_size = upper_batch_size
        self.direction_regularization = direction_regularization
        self.neumann_terms = neumann_terms
        self.method = method
        self.seed = config.SEED if seed is None else int(seed)
        self.upper_loss_tracker = keras.metrics.Mean(name="upper_loss")
        self._phase = "bilevel" if method == "bidora" else "joint"
        self._partition = None
        self.built = True

    # Forward pass and layers -------------------------------------------

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    @property
    def adapted_layers(self):
        """The `BiDoRADense` layers inside the wrapped model."""
        return adapted_layers(self.model)

    @property
    def magnitudes(self):
        """The magnitude variables (the upper level's variables)."""
        return [
            layer.magnitude
            for layer in self.adapted_layers
            if layer.magnitude is not None
        ]

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Quantizes the wrapped model's frozen layers, as `keras.Model`'s.

        Only the modes of `keras_bidora.config.QUANTIZATION_MODES` (int8,
        int4) are accepted, before anything is quantized. Each adapted
        layer's base kernel is quantized and dequantized inside its call;
        the adapters stay float and trainable, and the magnitudes keep
        their values (at injection, the float kernel's column norms).

        Args:
            mode: `"int8"` or `"int4"`; may be left to `config`.
            config: a `keras.quantizers.QuantizationConfig`.
            filters: which layers to quantize, as `keras.Model.quantize`.
                Defaults to the frozen layers, so that a task's head keeps
                training in float.
            **kwargs: passed to `keras.Model.quantize`.
        """
        requested = mode if mode is not None else getattr(config, "mode", None)
        check_quantization_mode(requested, f"mode={requested!r}")
        if filters is None:
            filters = _is_frozen
        super().quantize(mode, config=config, filters=filters, **kwargs)

    def export(
        self,
        filepath,
        format="tf_saved_model",
        verbose=None,
        input_signature=None,
        **kwargs,
    ):
        """Exports the model for inference, as `keras.Model.export`.

        What is exported is `keras_bidora.merge(self)`: the wrapped model
        with each adapter merged into its kernel, so the artifact computes
        what `predict` computes with plain layers, and serving it needs
        neither keras_bidora nor the column norms at every call. A model
        whose adapters were built by hand rather than by
        `keras_bidora.inject` cannot be merged, and the wrapped model is
        exported as it is. As with KerasHub's tasks, the artifact takes
        what the preprocessor returns (token ids), not raw text.

        Args:
            filepath: where to write the artifact.
            format: a format of `keras.Model.export` (`"tf_saved_model"`,
                `"onnx"`, `"torch"`, ...), as the backend supports it.
            verbose: whether to print a message.
            input_signature: the inputs' specs; inferred when None. On JAX,
                KerasHub's position embeddings need a fixed sequence
                length here.
            **kwargs: passed to `keras.Model.export`.

        Example:

        >>> import os, tempfile
        >>> import keras
        >>> import keras_bidora
        >>> inputs = keras.Input((8,))
        >>> hidden = keras.layers.Dense(8, name="query")(inputs)
        >>> base = keras.Model(inputs, keras.layers.Dense(1)(hidden))
        >>> model = keras_bidora.BiDoRAModel(base, rank=2, targets=["query"])
        >>> torch = keras.config.backend() == "torch"
        >>> path = os.path.join(tempfile.mkdtemp(), "m.pt2" if torch else "m")
        >>> model.export(path, "torch" if torch else "tf_saved_model")
        """
        served = merge(self) if is_injected(self) else self.model
        return served.export(
            filepath,
            format=format,
            verbose=verbose,
            input_signature=input_signature,
            **kwargs,
        )

    # Compile -------------------------------------------------------------

    def compile(
        self, optimizer="adamw", upper_optimizer=None, sampler=None, **kwargs
    ):
        """Configures the model for training with two optimizers.

        Without a `loss`, a compiled KerasHub task's own loss and metrics
        are used (e.g. a `CausalLM`'s cross-entropy, whose sample weights
        mask the padding out).

        Args:
            optimizer: the lower level's optimizer (direction and head),
                an instance or a name.
            upper_optimizer: the upper level's optimizer (magnitudes);
                defaults to a copy of `optimizer`'s config, named
                `"upper_" + optimizer.name` (Keras's learning-rate
                callbacks log each optimizer's rate by its name).
            sampler: for a generative task, the sampler `generate` uses
                (a name such as `"greedy"` or a `keras_hub.samplers`
                instance); None keeps the task's.
            **kwargs: passed to `keras.Model.compile` (`loss`, `metrics`,
                `jit_compile`, ...).
        """
        if sampler is not None:
            self._set_sampler(sampler)
        if "loss" not in kwargs:
            kwargs = {**_task_compile_arguments(self.model), **kwargs}
        if self.method == "bidora" and not self.magnitudes:
            raise ValueError(
                "BiDoRA trains magnitudes at its upper level, but no adapted "
                "layer has one (they were built with magnitude=False). Use "
                "magnitude=True, or train plain LoRA with keras.Model.fit."
            )
        if self.dtype_policy.name == "mixed_float16":
            raise ValueError(
                "BiDoRAModel does not support the mixed_float16 policy yet "
                "(Keras's LossScaleOptimizer cannot wrap its two optimizers); "
                "use mixed_bfloat16. Received: dtype policy "
                f"{self.dtype_policy.name!r}"
            )
        if (
            isinstance(optimizer, keras.optimizers.MultiOptimizer)
            and upper_optimizer is None
        ):
            multi = optimizer  # Reloaded from a saved compile config.
        else:
            lower = keras.optimizers.get(optimizer)
            if upper_optimizer is None:
                # A name of its own: callbacks such as ReduceLROnPlateau log
                # each optimizer's rate as `learning_rate_<name>`.
                upper = lower.__class__.from_config(
                    {**lower.get_config(), "name": f"upper_{lower.name}"}
                )
            else:
                upper = keras.optimizers.get(upper_optimizer)
            if upper is lower:
                raise ValueError(
                    "optimizer and upper_optimizer must be two different "
                    "optimizer instances: each level keeps its own state."
                )
            upper_map = {v.path: upper for v in self.magnitudes}
            multi = keras.optimizers.MultiOptimizer(
                keras.optimizers.OptimizerMap(lower, upper_map),
                name="bidora_optimizer",
            )
        self._partition = None
        super().compile(optimizer=multi, **kwargs)

    def _set_sampler(self, sampler):
        import keras_hub

        if raw_inputs.is_generative(self.model) is False:
            raise ValueError(
                "sampler is for a generative task (a CausalLM or "
                f"Seq2SeqLM). Received: sampler={sampler!r} for a "
                f"{type(self.model).__name__}"
            )
        self.model.sampler = keras_hub.samplers.get(sampler)
        # The task compiles its generate function around its sampler.
        self.model.generate_function = None

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None and self.sampler is not None:
            # KerasHub keeps the sampler out of a task's compile config; a
            # reloaded model would generate with its class's default.
            sampler = keras.saving.serialize_keras_object(self.sampler)
            config = {**config, "sampler": sampler}
        return config

    def compile_from_config(self, config):
        # Keras skips compiling a reloaded model whose `compile` is
        # overridden unless this is overridden too; without it, `.keras`
        # files reload with no optimizer (and lose both optimizers' states).
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    @property
    def lower_optimizer(self):
        """The lower level's optimizer (direction and head)."""
        return _keras_compat.default_optimizer(self.optimizer)

    @property
    def upper_optimizer(self):
        """The upper level's optimizer (magnitudes)."""
        lower = self.lower_optimizer
        for optimizer in self.optimizer.optimizers:
            if optimizer is not lower:
                return optimizer
        return None

    # Fit and retrain -----------------------------------------------------

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=True,
        class_weight=None,
        sample_weight=None,
        initial_epoch=0,
        steps_per_epoch=None,
        upper_data=None,
        upper_batch_size=None,
        **kwargs,
    ):
        """Trains the model; for `method="bidora"`, the bi-level phase.

        Takes `keras.Model.fit`'s arguments, plus:

        Args:
            upper_data: the upper split, as `(x, y)`, `(x, y,
                sample_weight)`, a `tf.data.Dataset` or a `PyDataset`. When
                given, all of `x, y` is lower data; otherwise `fit` holds out
                `upper_fraction` of `x, y` (seeded by `seed`). A dataset `x`
                is split as it is read, never held in memory: each element
                (each batch, when batched) goes to the upper split by a
                seeded rule, and a `PyDataset` by batch index.
            upper_batch_size: the upper level's batch size (a positive
                integer or `"proportional"`, as the model's); defaults to
                the model's `upper_batch_size`, then to `batch_size`.

        `class_weight` weighs the samples of both levels (labels given as
        arrays, `upper_data`'s too); `validation_data` is for evaluation
        only, and it never feeds the upper level. An epoch is one pass over
        the lower split. The bi-level phase refuses a Python generator,
        which can be neither split nor read again: pass a `PyDataset` or a
        `tf.data.Dataset` instead.

        Returns:
            A `keras.callbacks.History`.
        """
        upper_batch_size = _checked_upper_batch_size(upper_batch_size)
        callbacks = list(callbacks or [])
        # The variable lists a step reads are gathered anew for each fit.
        self._partition = None
        # As `keras.Model.fit`: validation batches as large as training
        # ones unless said otherwise.
        validation_batch_size = (
            kwargs.pop("validation_batch_size", None) or batch_size
        )
        validation_data = inputs.validation_batches(
            self, validation_data, validation_batch_size
        )
        if validation_split:
            if validation_data is not None or upper_data is not None:
                raise ValueError(
                    "validation_split cannot be combined with "
                    "validation_data or upper_data."
                )
            if bilevel_dataset.is_dataset(x) or isinstance(
                x, types.GeneratorType
            ):
                raise ValueError(
                    "validation_split holds out the last samples of arrays "
                    "(as in keras.Model.fit); for a dataset or a generator, "
                    "pass validation_data. Received: x of type "
                    f"{type(x).__name__}"
                )
            (x, y, sample_weight), validation_data = _split_tail(
                (raw_inputs.as_arrays(x), y, sample_weight), validation_split
            )
            validation_data = inputs.validation_batches(
                self, validation_data, validation_batch_size
            )
        if bilevel_dataset.is_dataset(validation_data):
            validation_batch_size = None
        if self._phase != "bilevel":
            self._build_optimizer()
            prepared = inputs.plain_data(
                self, x, y, sample_weight, batch_size, shuffle
            )
            if prepared is not None:
                x, y, sample_weight = prepared.data, None, None
                batch_size = None
                callbacks.append(_EpochSetter(prepared.epoch_setter))
            return super().fit(
                x,
                y,
                batch_size=batch_size,
                epochs=epochs,
                verbose=verbose,
                callbacks=callbacks + [_NonFiniteLossGuard()],
                validation_data=validation_data,
                validation_batch_size=validation_batch_size,
                shuffle=shuffle,
                class_weight=class_weight,
                sample_weight=sample_weight,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps_per_epoch,
                **kwargs,
            )
        _check_bilevel_fit(steps_per_epoch, x)
        if class_weight is not None:
            sample_weight, upper_data = inputs.class_weighted(
                x, y, sample_weight, upper_data, class_weight
            )
        prepared = inputs.bilevel_data(
            self,
            x,
            y,
            sample_weight,
            upper_data,
            batch_size,
            upper_batch_size,
            shuffle,
        )
        if prepared.epoch_setter is not None:
            prepared.epoch_setter.set_epoch(initial_epoch)
            callbacks.insert(0, _EpochSetter(prepared.epoch_setter))
        self._build_for_training(prepared.first_batch)
        return super().fit(
            prepared.data,
            epochs=epochs,
            verbose=verbose,
            callbacks=callbacks + [_NonFiniteLossGuard()],
            validation_data=validation_data,
            validation_batch_size=validation_batch_size,
            shuffle=False,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            **kwargs,
        )

    def evaluate(
        self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs
    ):
        """`keras.Model.evaluate`; raw inputs go through the preprocessor."""
        prepared = inputs.plain_data(
            self, x, y, sample_weight, batch_size, False
        )
        if prepared is not None:
            x, y, sample_weight, batch_size = prepared.data, None, None, None
        return super().evaluate(
            x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs
        )

    def predict(self, x, batch_size=None, **kwargs):
        """`keras.Model.predict`; raw inputs go through the preprocessor."""
        prepared = inputs.plain_data(self, x, None, None, batch_size, False)
        if prepared is not None:
            x, batch_size = prepared.data, None
        return super().predict(x, batch_size=batch_size, **kwargs)

    def train_on_batch(
        self,
        x,
        y=None,
        sample_weight=None,
        class_weight=None,
        return_dict=False,
        upper_data=None,
    ):
        """One training step on one batch, for one's own training loop.

        Raw inputs go through the task's preprocessor, as a KerasHub task's
        `train_on_batch` takes them. In the bi-level phase
        (`method="bidora"`), the step is a lower step on `(x, y,
        sample_weight)` and, when `upper_data` is given, an upper step on
        it (whatever `upper_every`); without `upper_data`, the lower step
        alone: the direction and the head train, the magnitudes stay fixed,
        as in the retrain phase. With `method="dora"`, the step of
        `keras.Model.train_on_batch`, both parts on `(x, y)`.

        Args:
            x, y, sample_weight, class_weight, return_dict: as
                `keras.Model.train_on_batch` (`class_weight` weighs the
                upper batch too, as in `fit`).
            upper_data: a batch of the upper split, `(x, y)` or `(x, y,
                sample_weight)` (a causal LM's: its `x` alone), for
                `method="bidora"`.

        Returns:
            The step's loss and metrics, as `keras.Model.train_on_batch`;
            `upper_loss` among them when an upper step ran.

        Example:

        >>> import keras, numpy as np
        >>> import keras_bidora
        >>> inputs = keras.Input((4,))
        >>> hidden = keras.layers.Dense(8, name="hidden")(inputs)
        >>> outputs = keras.layers.Dense(2, name="head")(hidden)
        >>> base = keras.Model(inputs, outputs)
        >>> model = keras_bidora.BiDoRAModel(base, rank=2, targets=["hidden"])
        >>> model.compile(optimizer="adam", loss="mse")
        >>> x, y = np.ones((8, 4)), np.zeros((8, 2))
        >>> logs = model.train_on_batch(
        ...     x, y, upper_data=(x[:4], y[:4]), return_dict=True
        ... )
        >>> sorted(logs)
        ['loss', 'upper_loss']
        """
        if self._phase != "bilevel":
            if upper_data is not None:
                raise ValueError(
                    "upper_data is for the bi-level phase of "
                    "method='bidora'; this model trains as "
                    f"method={self.method!r} (phase {self._phase!r}). "
                    "Received: upper_data of type "
                    f"{type(upper_data).__name__}"
                )
            self._build_optimizer()
            x, y, sample_weight = inputs.one_batch(self, x, y, sample_weight)
            return super().train_on_batch(
                x,
                y,
                sample_weight=sample_weight,
                class_weight=class_weight,
                return_dict=return_dict,
            )
        if class_weight is not None:
            sample_weight, upper_data = inputs.class_weighted(
                x, y, sample_weight, upper_data, class_weight
            )
        lower, upper, due = inputs.bilevel_batch(
            self, x, y, sample_weight, upper_data
        )
        self._build_for_training(lower)
        # Keras passes (x, y, sample_weight) to the step as fit's elements.
        logs = super().train_on_batch(lower, upper, due, return_dict=True)
        if upper_data is None:
            logs.pop("upper_loss", None)
        return logs if return_dict else self._flatten_metrics_in_order(logs)

    def test_on_batch(self, x, y=None, sample_weight=None, return_dict=False):
        """`keras.Model.test_on_batch`; raw inputs go through the
        preprocessor."""
        x, y, sample_weight = inputs.one_batch(self, x, y, sample_weight)
        return super().test_on_batch(
            x, y, sample_weight=sample_weight, return_dict=return_dict
        )

    def predict_on_batch(self, x):
        """`keras.Model.predict_on_batch`; raw inputs go through the
        preprocessor."""
        x, _, _ = inputs.one_batch(self, x)
        return super().predict_on_batch(x)

    # The task's own methods ----------------------------------------------

    def __dir__(self):
        # Keras's saving walks `dir(model)` for weights: the task's
        # backbone, preprocessor and sampler are reached through `model`,
        # and listing them here too would save the backbone's weights under
        # a new path, so that files saved before could not be loaded.
        return [
            name for name in super().__dir__() if name not in _TASK_ATTRIBUTES
        ]

    @property
    def preprocessor(self):
        """The wrapped task's preprocessor (None for a backbone)."""
        return raw_inputs.preprocessor_of(self.model)

    @property
    def backbone(self):
        """The wrapped task's backbone (the model itself for a backbone)."""
        return getattr(self.model, "backbone", self.model)

    @property
    def sampler(self):
        """The wrapped generative task's sampler (None otherwise)."""
        return getattr(self.model, "sampler", None)

    def generate(self, inputs, max_length=None, **kwargs):
        """The wrapped task's `generate`, with the trained adapters.

        Args:
            inputs: prompts, as the task's `generate` takes them.
            max_length: the longest output, in tokens.
            **kwargs: passed to the task's `generate` (`stop_token_ids`,
                `strip_prompt`).

        Returns:
            What the task's `generate` returns (text for raw prompts).
        """
        generate = self._task_method("generate")
        if keras.config.backend() == "jax" and hasattr(self, "jax_state_sync"):
            self.jax_state_sync()
        return generate(inputs, max_length=max_length, **kwargs)

    def score(self, *args, **kwargs):
        """The wrapped task's `score` (e.g. a `CausalLM`'s token scores)."""
        return self._task_method("score")(*args, **kwargs)

    def save_to_preset(self, preset_dir, max_shard_size=10):
        """Saves the merged KerasHub model as a preset, like KerasHub's.

        The preset holds `keras_bidora.merge(self)`: the wrapped task (or
        backbone) with each adapter merged into its kernel, and the
        preprocessor's assets, so that `from_preset(preset_dir)` (e.g.
        `keras_hub.models.TextClassifier.from_preset`) loads a plain
        KerasHub model computing what this one computes, with no
        keras_bidora installed. To keep only the adapters, use
        `keras_bidora.save_adapter_weights`; to go on training, `save`.

        Args:
            preset_dir: the preset's folder.
            max_shard_size: the largest weights file, in GB (None: one
                file), as KerasHub's `save_to_preset`.
        """
        if not callable(getattr(self.model, "save_to_preset", None)):
            raise AttributeError(
                f"The wrapped model {type(self.model).__name__} has no "
                "`save_to_preset` method: presets are KerasHub's, saved from "
                "a task or backbone. Save this model with `save`, or its "
                "adapters with keras_bidora.save_adapter_weights."
            )
        merge(self).save_to_preset(preset_dir, max_shard_size=max_shard_size)

    def _task_method(self, name):
        method = getattr(self.model, name, None)
        if not callable(method):
            raise AttributeError(
                f"The wrapped model {type(self.model).__name__} has no "
                f"`{name}` method; `{name}` needs a KerasHub task that has "
                "one (a CausalLM or Seq2SeqLM)."
            )
        return method

    def retrain(
        self,
        x=None,
        y=None,
        epochs=1,
        reinitialize_direction=True,
        **fit_kwargs,
    ):
        """The second phase: direction and head on all data, `m` frozen.

        Args:
            x, y: all the training data (lower and upper splits together).
            epochs: number of epochs.
            reinitialize_direction: re-initialise each adapter's `lora_a`
                (and set `lora_b` to zero) first, as the official code does;
                the lower optimizer then starts afresh, as a new one would:
                its slots (moments, moving averages, accumulated gradients)
                are zeroed and its step count reset, so Adam's bias
                correction and a learning-rate schedule start over. A
                learning rate set by a callback stays.
            **fit_kwargs: passed to `keras.Model.fit`.

        Returns:
            A `keras.callbacks.History`.
        """
        if self.optimizer is None:
            raise ValueError("Call compile() before retrain().")
        callbacks = list(fit_kwargs.pop("callbacks", None) or [])
        if reinitialize_direction:
            # Once fit has taken its arguments and data, so that a call it
            # refuses leaves the trained direction as it was.
            callbacks.insert(0, _OnTrainBegin(self._reinitialize_direction))
        previous = self._phase
        self._set_phase("retrain")
        try:
            return self.fit(
                x, y, epochs=epochs, callbacks=callbacks, **fit_kwargs
            )
        finally:
            self._set_phase(previous)

    def _reinitialize_direction(self):
        """Fresh `lora_a`, zero `lora_b`, the lower optimizer started afresh.

        Its step count goes back to zero with its slots: zeroed moments
        at a late step would make Adam's bias-corrected steps several
        times larger than a new optimizer's.
        """
        for layer in self.adapted_layers:
            layer.lora_a.assign(
                layer.lora_a_initializer(layer.lora_a.shape, layer.lora_a.dtype)
            )
            layer.lora_b.assign(
                ops.zeros(layer.lora_b.shape, layer.lora_b.dtype)
            )
        lower = self.lower_optimizer
        if lower.built:
            rate = _keras_compat.learning_rate_variable(lower)
            for variable in lower.variables:
                if variable is not rate:
                    variable.assign(ops.zeros(variable.shape, variable.dtype))

    def _set_phase(self, phase):
        if phase != self._phase:
            self._phase = phase
            self.train_function = None

    def _build_for_training(self, lower_batch):
        # Keras builds metrics, loss and optimizer from the first batch of
        # fit's data, which here is a (lower, upper, due) triple; build them
        # from a lower batch instead.
        if keras.config.backend() == "tensorflow":
            # Under a tf.distribute strategy, variables (optimizer states
            # included) must be created in its scope.
            with self.distribute_strategy.scope():
                _keras_compat.symbolic_build(self, lower_batch)
        else:
            _keras_compat.symbolic_build(self, lower_batch)

    def _build_optimizer(self):
        # Keras's TensorFlow trainer (without a strategy) leaves building
        # the optimizer to its first `apply`, which this train step never
        # calls (it applies each level's optimizer); the MultiOptimizer
        # would then stay unbuilt and fail in `finalize_variable_values`.
        if self.optimizer is None or self.optimizer.built:
            return
        if keras.config.backend() == "tensorflow":
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        else:
            self.optimizer.build(self.trainable_variables)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras's TF trainer builds from fit's first batch under a strategy,
        # reducing it across replicas first; the bi-level batches (with their
        # boolean due flags) are built from by `_build_for_training` instead.
        if self._phase == "bilevel":
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    # Train step ----------------------------------------------------------

    @property
    def partition(self):
        """The two levels' variables and optimizer slots (`Partition`)."""
        if self._partition is None:
            self._build_optimizer()
            self._partition = Partition(
                self.trainable_variables,
                self.magnitudes,
                self.optimizer.variables,
                self.lower_optimizer,
                self.upper_optimizer,
                self.optimizer.iterations,
                non_trainable_variables=self.non_trainable_variables,
                metrics_variables=self.metrics_variables,
                adapted_layers=self.adapted_layers,
            )
        return self._partition

    def train_step(self, *args):
        step = STEPS[self._phase]
        call_step = backend_lib.get().call_step
        if keras.config.backend() == "jax":
            state, data = args
            return call_step(step, self, state, data)
        # TensorFlow and torch: run the stateless step on the variables'
        # values, then write back what the optimizers did not update.
        (data,) = args
        partition = self.partition
        state = (
            [_value(v) for v in partition.trainable_variables],
            None,
            [_value(v) for v in partition.optimizer_variables],
            [_value(v) for v in partition.metrics_variables],
        )
        logs, (_, non_trainable, optimizer_values, metrics) = call_step(
            step, self, state, data
        )
        # Each level's optimizer updated itself; the MultiOptimizer's own
        # step counter lives only in the returned values.
        index = partition.iterations_slot
        self.optimizer.iterations.assign(optimizer_values[index])
        for variable, value in non_trainable:
            variable.assign(value)
        for variable, value in zip(partition.metrics_variables, metrics):
            variable.assign(value)
        return logs

    def test_step(self, *args):
        # As in the train steps, the column norms once per group of layers.
        with shared_column_scales(self.adapted_layers):
            result = super().test_step(*args)
        # The upper loss is a training quantity: keep `val_upper_loss` out.
        if keras.config.backend() == "jax":
            logs, state = result
            return self._without_upper_loss(logs), state
        return self._without_upper_loss(result)

    def predict_step(self, *args):
        with shared_column_scales(self.adapted_layers):
            return super().predict_step(*args)

    @staticmethod
    def _without_upper_loss(logs):
        return {k: v for k, v in logs.items() if k != "upper_loss"}

    @property
    def metrics(self):
        metrics = super().metrics
        if self._phase != "bilevel":
            metrics = [m for m in metrics if m is not self.upper_loss_tracker]
        return metrics

    # Serialization -------------------------------------------------------

    def get_config(self):
        if is_injected(self.model):
            model = injection_config(self.model)
            # Layers quantized after the injection are not quantized in the
            # model's config.
            quantization = quantized_layers(self.model)
        else:
            # BiDoRADense layers built by hand serialize with the model
            # (quantized ones too), and there is nothing to inject.
            model = {"model": keras.saving.serialize_keras_object(self.model)}
            quantization = {}
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model": model,
            "quantization": quantization,
            "upper_fraction": self.upper_fraction,
            "hypergradient": self.hypergradient,
            "upper_every": self.upper_every,
            "upper_batch_size": self.upper_batch_size,
            "direction_regularization": self.direction_regularization,
            "neumann_terms": self.neumann_terms,
            "method": self.method,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        injection = dict(config.pop("model"))
        quantization = config.pop("quantization", {})
        if injection.get("alpha", 0) is None:
            # Files saved before `alpha` was resolved at injection stored
            # None, which then meant `alpha = rank`.
            injection["alpha"] = injection["rank"]
        model = keras.saving.deserialize_keras_object(
            injection.pop("model"), custom_objects=custom_objects
        )
        quantize_layers(model, quantization)
        if not adapted_layers(model):
            inject(model, **injection)
        return cls(model, **injection, **config)


# What `BiDoRAModel` reads from the wrapped task, kept out of saving's walk.
_TASK_ATTRIBUTES = ("backbone", "preprocessor", "sampler")


def _value(variable):
    return ops.convert_to_tensor(variable.value)


def _task_compile_arguments(task):
    """The loss and metrics a compiled KerasHub task was compiled with."""
    if (
        not getattr(task, "compiled", False)
        or getattr(task, "loss", None) is None
    ):
        return {}
    compiled = keras.saving.deserialize_keras_object(task.get_compile_config())
    return {
        key: compiled[key]
        for key in ("loss", "metrics", "weighted_metrics")
        if compiled.get(key) is not None
    }


def _is_frozen(layer):
    return not layer.trainable


def _check_bilevel_fit(steps_per_epoch, x):
    if isinstance(x, types.GeneratorType):
        raise ValueError(
            "The bi-level phase splits its data and reads the upper split "
            "again within each epoch, and each epoch from the start, which "
            "a Python generator cannot do. Pass a keras.utils.PyDataset "
            "(split by batches), a tf.data.Dataset (e.g. "
            "tf.data.Dataset.from_generator; split as it is read) or "
            "arrays. Received: x of type generator"
        )
    if steps_per_epoch is not None and not raw_inputs.is_tf_dataset(x):
        raise ValueError(
            "The bi-level phase runs one pass over the lower split of "
            "arrays or of a PyDataset per epoch; steps_per_epoch is only "
            "for a tf.data.Dataset (a stream). Received: "
            f"steps_per_epoch={steps_per_epoch} with x of type "
            f"{type(x).__name__}"
        )


def _split_tail(arrays, fraction):
    """Keras's `validation_split`: the last `fraction` of the samples."""
    flat = [a for a in keras.tree.flatten(arrays) if a is not None]
    size = len(flat[0])
    cut = int(math.floor(size * (1.0 - fraction)))
    head = keras.tree.map_structure(
        lambda a: None if a is None else np.asarray(a)[:cut], arrays
    )
    tail = keras.tree.map_structure(
        lambda a: None if a is None else np.asarray(a)[cut:], arrays
    )
    return head, tuple(a for a in tail if a is not None)


def _checked_upper_batch_size(upper_batch_size):
    """`upper_batch_size` as the model keeps it, or a `ValueError`.

    It takes a positive integer (kept as an `int`), None (the lower batch
    size) and `config.UPPER_BATCH_SIZE_PROPORTIONAL`.
    """
    if upper_batch_size is None or (
        isinstance(upper_batch_size, str)
        and upper_batch_size == config.UPPER_BATCH_SIZE_PROPORTIONAL
    ):
        return upper_batch_size
    try:
        return check_count("upper_batch_size", upper_batch_size, 1)
    except ValueError:
        raise ValueError(
            "upper_batch_size must be a positive integer, None (the lower "
            f"batch size) or {config.UPPER_BATCH_SIZE_PROPORTIONAL!r}. "
            f"Received: upper_batch_size={upper_batch_size!r}"
        ) from None


def _check_arguments(
    upper_fraction,
    hypergradient,
    direction_regularization,
    method,
):
    """Raises a `ValueError` quoting the first invalid bi-level setting."""
    if not (
        isinstance(upper_fraction, (int, float)) and 0 < upper_fraction < 1
    ):
        raise ValueError(
            "upper_fraction must be a number in (0, 1). Received: "
            f"upper_fraction={upper_fraction}"
        )
    hypergradients.get(hypergradient)
    if not (
        isinstance(direction_regularization, (int, float))
        and direction_regularization >= 0
    ):
        raise ValueError(
            "direction_regularization must be a number >= 0. Received: "
            f"direction_regularization={direction_regularization}"
        )
    if method not in config.MODEL_METHODS:
        raise ValueError(
            f"method must be one of {config.MODEL_METHODS}. Received: "
            f"method={method!r}"
        )
