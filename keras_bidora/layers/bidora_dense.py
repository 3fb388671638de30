"""The BiDoRADense layer: a weight-decomposed low-rank adapter."""

import collections
import contextlib
import math
import string
import threading

import keras
from keras import ops

from keras_bidora import _keras_compat
from keras_bidora import config
from keras_bidora.checks import check_count
from keras_bidora.training import backend as backend_lib

_MIXED_VARIABLE_DTYPES = ("float16", "bfloat16")


def _equation_axes(equation, kernel_rank):
    """Splits an EinsumDense equation into its parts.

    Returns `(input_spec, kernel_spec, output_spec, in_letters, out_letters)`
    where `in_letters` are the kernel axes contracted with the input and
    `out_letters` the kernel axes kept in the output, both in kernel order.
    """
    try:
        inputs, output_spec = equation.replace(" ", "").split("->")
        input_spec, kernel_spec = inputs.split(",")
    except ValueError:
        raise ValueError(
            "The wrapped EinsumDense must have an equation of the form "
            f"'ab,bc->ac'. Received: equation={equation}"
        )
    if "." in kernel_spec or len(kernel_spec) != kernel_rank:
        raise ValueError(
            "The kernel part of the equation must name each kernel axis "
            f"with one letter. Received: equation={equation} for a kernel "
            f"of rank {kernel_rank}"
        )
    plain_input = input_spec.replace("...", "")
    plain_output = output_spec.replace("...", "")
    in_letters = ""
    out_letters = ""
    for letter in kernel_spec:
        if letter in plain_output:
            out_letters += letter
        elif letter in plain_input:
            in_letters += letter
        else:
            raise ValueError(
                f"Kernel axis '{letter}' appears neither in the input nor in "
                f"the output. Received: equation={equation}"
            )
    if not in_letters:
        raise ValueError(
            "The equation has no kernel axis contracted with the input, so "
            "there is no column norm to take. Received: "
            f"equation={equation}"
        )
    if not out_letters:
        raise ValueError(
            "The equation has no kernel axis in its output, so there is no "
            f"output unit to scale. Received: equation={equation}"
        )
    return input_spec, kernel_spec, output_spec, in_letters, out_letters


@keras.saving.register_keras_serializable(package="keras_bidora")
class BiDoRADense(keras.layers.Layer):
    """Weight-decomposed low-rank adapter around a `Dense` or `EinsumDense`.

    The wrapped layer's kernel `W0` is read as a matrix with one row per
    input unit (the kernel axes contracted with the input, in kernel order)
    and one column per output unit (the remaining kernel axes, in kernel
    order). The adapted kernel is

    ```
    W' = m * (W0 + s * A @ B) / ||W0 + s * A @ B||_c,    s = alpha / rank
    ```

    where `||.||_c` is the norm of each column (over the input side),
    `A` (`lora_a`, in x rank) and `B` (`lora_b`, rank x out) form the
    low-rank direction update and `m` (`magnitude`, one entry per output
    unit) the magnitude. `m` starts at `W0`'s column norms and `B` at
    zero, so that at initialisation the layer computes exactly what the
    wrapped layer computes. `W0` and the wrapped layer's bias stay frozen.

    The output is computed without forming `W'`:
    `y = (m / ||W0 + sAB||_c) * (x W0 + s * dropout(x) A B) + bias`, so the
    backward pass never needs a gradient the size of the kernel.

    With `magnitude=False` the layer is plain LoRA on the same matrix view,
    `W' = W0 + s * A @ B`, which gives LoRA, DoRA and BiDoRA identical
    direction parameters for comparisons.

    Adapter variables are kept in float32 under a mixed-precision policy
    (like Keras's own LoRA) and the output comes back in the layer's compute
    dtype.

    The wrapped layer may be quantized to one of
    `keras_bidora.config.QUANTIZATION_MODES` (int8, int4) with
    `layer.quantize(mode)`, before it is wrapped or after (a model's
    `quantize` reaches the wrapped layer). `W0` is then dequantized inside
    the call and never stored in float; the column norm is that of the
    dequantized `W0 + s * A @ B`, the adapters stay float and are the only
    trainable variables, and the layer computes in the float policy the
    base was quantized from. A magnitude made before the quantization keeps
    the float kernel's column norms.

    Args:
        layer: a built `keras.layers.Dense` or `keras.layers.EinsumDense`.
        rank: int >= 1, the rank of the direction update.
        alpha: positive float, the scale numerator; `s = alpha / rank`.
            Defaults to `2 * rank` (so `s = 2`, see `keras_bidora.config`).
        dropout: float in [0, 1), dropout on the adapter's input.
        detach_norm: bool. If `True`, the column norm is treated as a
            constant in the backward pass (DoRA paper, section 4.3), which
            saves a little memory and compute; the forward pass is
            unchanged. Defaults to `False`: the exact gradient, since in
            this formulation the norm costs only O(in * out * rank).
        magnitude: bool. `False` gives plain LoRA (no magnitude, no norm).
        lora_a_initializer: initializer for `A`. Defaults to
            `"he_uniform"`, as `keras.layers.Dense.enable_lora`.
        **kwargs: base layer arguments (`name`, `dtype`, ...). The name and
            dtype policy default to the wrapped layer's.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_bidora import BiDoRADense
    >>> query = keras.layers.EinsumDense("abc,cde->abde", (None, 2, 4))
    >>> query.build((None, 5, 8))
    >>> adapted = BiDoRADense(query, rank=2, alpha=4)
    >>> x = np.random.rand(3, 5, 8).astype("float32")
    >>> bool(np.allclose(adapted(x), query(x), atol=1e-6))
    True
    >>> tuple(adapted.lora_a.shape), tuple(adapted.magnitude.shape)
    ((8, 2), (2, 4))

    Reference:
        - [Liu et al., 2024. DoRA: Weight-Decomposed Low-Rank Adaptation](
          https://arxiv.org/abs/2402.09353)
        - [Qin et al., 2024. BiDoRA: Bi-level Optimization-Based
          Weight-Decomposed Low-Rank Adaptation](
          https://arxiv.org/abs/2410.09758)
    """

    def __init__(
        self,
        layer,
        rank=config.RANK,
        alpha=None,
        dropout=config.DROPOUT,
        detach_norm=config.DETACH_NORM,
        magnitude=True,
        lora_a_initializer=config.LORA_A_INITIALIZER,
        **kwargs,
    ):
        _check_layer(layer)
        rank = check_count("rank", rank, 1)
        _check_settings(alpha, dropout)
        if alpha is None:
            alpha = config.default_alpha(rank)
        kwargs.setdefault("name", layer.name)
        policy = layer.dtype_policy
        if layer.quantization_mode is not None:
            # The adapters compute in float: a quantized policy would make
            # Keras call a quantized forward pass this layer does not have.
            policy = float_policy(policy)
        kwargs.setdefault("dtype", policy)
        # Variables are read in their own dtype and cast explicitly in
        # `call`: the column norm is taken in float32 under a mixed policy,
        # where autocasting would first round W0 to the compute dtype. (Keras
        # still autocasts the wrapped layer's kernel when a mixed-policy
        # BiDoRADense is called on its own, outside any model.)
        kwargs["autocast"] = False
        super().__init__(**kwargs)
        self.layer = layer
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.detach_norm = bool(detach_norm)
        self.use_magnitude = bool(magnitude)
        self.lora_a_initializer = keras.initializers.get(lora_a_initializer)
        self.scale = alpha / rank
        self._analyze_kernel()
        self.dropout_layer = keras.layers.Dropout(
            dropout, dtype=self.dtype_policy, name="dropout"
        )
        self.magnitude = None
        self.lora_a = None
        self.lora_b = None
        self._frozen_cache = None
        self._group_cache = None
        self._off_diagonal_cache = None

    def _analyze_kernel(self):
        kernel_shape = tuple(self.layer.kernel.shape)
        if isinstance(self.layer, keras.layers.EinsumDense):
            (
                input_spec,
                kernel_spec,
                output_spec,
                in_letters,
                out_letters,
            ) = _equation_axes(self.layer.equation, len(kernel_shape))
        else:
            input_spec, kernel_spec, output_spec = "...a", "ab", "...b"
            in_letters, out_letters = "a", "b"
        in_axes = [kernel_spec.index(c) for c in in_letters]
        out_axes = [kernel_spec.index(c) for c in out_letters]
        self._kernel_shape = kernel_shape
        self._in_shape = tuple(kernel_shape[i] for i in in_axes)
        self._out_shape = tuple(kernel_shape[i] for i in out_axes)
        self._in_units = math.prod(self._in_shape)
        self._out_units = math.prod(self._out_shape)
        # Kernel order -> (in axes, out axes) and back.
        self._matrix_perm = in_axes + out_axes
        self._kernel_perm = [
            self._matrix_perm.index(i) for i in range(len(kernel_shape))
        ]
        used = (
            set(self.layer.equation)
            if hasattr(self.layer, "equation")
            else set()
        )
        rank_letter = next(c for c in string.ascii_letters if c not in used)
        plain_output = output_spec.replace("...", "")
        kept = "".join(c for c in input_spec if c in plain_output)
        prefix = "..." if "..." in input_spec else ""
        low_rank_spec = prefix + kept + rank_letter
        self._down_equation = (
            f"{input_spec},{in_letters}{rank_letter}->{low_rank_spec}"
        )
        self._up_equation = (
            f"{low_rank_spec},{rank_letter}{out_letters}->{output_spec}"
        )
        # The per-unit scale broadcasts against the output's trailing axes.
        tail = output_spec.split("...")[-1]
        if not set(out_letters) <= set(tail):
            raise ValueError(
                "The kernel's output axes must come after any '...' in the "
                f"output. Received: equation={self.layer.equation}"
            )
        order = [c for c in tail if c in out_letters]
        self._scale_perm = [out_letters.index(c) for c in order]
        self._scale_shape = tuple(
            self._out_shape[out_letters.index(c)] if c in out_letters else 1
            for c in tail
        )
        # A Dense layer, or an EinsumDense that is one in disguise: the
        # input's trailing axes are the kernel's input axes, in kernel
        # order, and the output is the input's other axes followed by the
        # kernel's output axes. Such a layer is called as a matrix product
        # with the (in, out) matrices.
        kept_input = input_spec[: len(input_spec) - len(in_letters)]
        self._matrix_form = (
            input_spec.endswith(in_letters)
            and output_spec == kept_input + out_letters
            and not set(out_letters) & set(input_spec)
        )

    @property
    def adapter_dtype(self):
        """Dtype of the adapter variables: float32 under mixed precision."""
        dtype = self.dtype_policy.variable_dtype
        return "float32" if dtype in _MIXED_VARIABLE_DTYPES else dtype

    def build(self, input_shape=None):
        self.layer.trainable = False
        dtype = self.adapter_dtype
        # `autocast=False` on the adapters too: Keras 3.15 enters an autocast
        # scope for a top-level call of a mixed-policy layer even when the
        # layer's own `autocast` is False.
        if self.use_magnitude:
            self.magnitude = self.add_weight(
                name="magnitude",
                shape=self._out_shape,
                initializer=self._initial_magnitude,
                dtype=dtype,
                autocast=False,
            )
        self.lora_a = self.add_weight(
            name="lora_a",
            shape=(self._in_units, self.rank),
            initializer=self.lora_a_initializer,
            dtype=dtype,
            autocast=False,
        )
        self.lora_b = self.add_weight(
            name="lora_b",
            shape=(self.rank, self._out_units),
            initializer="zeros",
            dtype=dtype,
            autocast=False,
        )

    def _initial_magnitude(self, shape, dtype):
        """`||W0||_c`: the magnitude at which `W'` is `W0`."""
        _, base_squared = self._frozen_parts()
        return ops.reshape(_cast(ops.sqrt(base_squared), dtype), shape)

    def _base_kernel(self, dtype):
        """`W0` in `dtype`, dequantized when the base is int8 or int4."""
        if self.layer.quantization_mode is None:
            return _cast(self.layer.kernel.value, dtype)
        # The base may have been quantized after this layer was made.
        _check_quantization(self.layer)
        return _keras_compat.dequantized_kernel(self.layer, dtype)

    @property
    def kernel_dtype(self):
        """The float dtype of `W0`: its variable dtype, even if quantized."""
        return self.layer.dtype_policy.variable_dtype

    def _base_matrix(self, dtype):
        kernel = _transpose(self._base_kernel(dtype), self._matrix_perm)
        return _reshape(kernel, (self._in_units, self._out_units))

    def direction_matrix(self):
        """Returns `W0 + s * A @ B` as an (in, out) matrix, in float32."""
        dtype = self.adapter_dtype
        update = ops.matmul(self.lora_a, self.lora_b) * self.scale
        return self._base_matrix(dtype) + update

    def _low_rank_parts(self, frozen=None):
        """The pieces of `||W0 + s*A@B||_c ** 2` (see `_norm_parts`), from
        `_frozen_parts()` (computed here if not given)."""
        base, base_squared = frozen or self._frozen_parts()
        return _norm_parts(
            base,
            base_squared,
            self.lora_a.value,
            self.lora_b.value,
            self.scale,
        )

    def _frozen_key(self):
        # A quantized W0 is dequantized in each call, never kept in float.
        if self.layer.quantization_mode is not None:
            return None
        return backend_lib.get().frozen_key(
            [v.value for v in self.layer.weights]
        )

    def _frozen_parts(self):
        """`W0` as an (in, out) matrix and its squared column norms.

        Both in the adapter dtype. Where the backend can tell that `W0`'s
        variables hold the values they held when these were computed
        (eager torch: the same tensors at the same version), they are kept
        and reused; elsewhere they are computed on each call.
        """

        def compute():
            base = self._base_matrix(self.adapter_dtype)
            return base, ops.sum(ops.square(base), axis=0)

        return _kept(self, "_frozen_cache", self._frozen_key(), compute)

    def column_scale(self):
        """Returns `m / ||W0 + s * A @ B||_c`, one entry per output unit.

        Inside a `shared_column_scales` block that holds this layer, the
        scale is its group's.
        """
        return self._scale()

    def _scale(self, frozen=None):
        """`column_scale()`, from `frozen` (`_frozen_parts()`) where the
        caller has it."""
        shared = _SharedNorms.covering(self)
        if shared is not None:
            return shared.column_scale(self)
        return self._column_scale(self._low_rank_parts(frozen))

    def _column_scale(self, parts):
        # At least epsilon: `norm_squared` is at least its square.
        norm = ops.sqrt(parts.norm_squared())
        if self.detach_norm:
            norm = ops.stop_gradient(norm)
        return _reshape(self.magnitude.value, (self._out_units,)) / norm

    def merged_kernel(self):
        """Returns the adapted kernel `W'` in the wrapped kernel's shape.

        Returns:
            A tensor of the wrapped kernel's shape, in its float dtype
            (`kernel_dtype`: float32 for an int8 or int4 base).
        """
        matrix = self.direction_matrix()
        if self.use_magnitude:
            matrix = matrix * self.column_scale()
        kernel = ops.reshape(matrix, self._in_shape + self._out_shape)
        kernel = ops.transpose(kernel, self._kernel_perm)
        return ops.cast(kernel, self.kernel_dtype)

    def merged_layer(self):
        """Returns a plain `Dense`/`EinsumDense` holding the adapted kernel.

        The new layer has the wrapped layer's config (name included) and
        bias, and its kernel is `merged_kernel()`; it holds no keras_bidora
        objects and computes what this layer computes. For an int8 or int4
        base it is a float layer (the policy the base was quantized from);
        call its `quantize(mode)` to quantize it again.

        Returns:
            A built `keras.layers.Dense` or `keras.layers.EinsumDense`.
        """
        layer_config = self.layer.get_config()
        if self.layer.quantization_mode is not None:
            layer_config["dtype"] = float_policy(self.layer.dtype_policy)
            layer_config.pop("quantization_config", None)
        merged = self.layer.__class__.from_config(layer_config)
        merged.build_from_config(self.layer.get_build_config())
        merged.kernel.assign(self.merged_kernel())
        if self.layer.bias is not None:
            merged.bias.assign(self.layer.bias)
        return merged

    def call(self, inputs, training=None):
        # The reshapes, transposes and casts below are skipped where they
        # change nothing (a float32 policy, a kernel with one input axis):
        # at small shapes each op's dispatch costs more than its arithmetic.
        compute_dtype = self.compute_dtype
        inputs = _cast(inputs, compute_dtype)
        if self._matrix_form:
            outputs = self._matrix_call(inputs, training, compute_dtype)
        else:
            outputs = self._einsum_call(inputs, training, compute_dtype)
        if self.layer.bias is not None:
            outputs = outputs + _cast(self.layer.bias.value, compute_dtype)
        if self.layer.activation is not None:
            outputs = self.layer.activation(outputs)
        return outputs

    def _matrix_call(self, inputs, training, compute_dtype):
        """`(m/||V||_c) * (x W0 + s x A B)` with the (in, out) matrices: the
        input's kernel axes flattened to one, the output's unflattened."""
        in_rank = len(self._in_shape)
        if in_rank > 1 or len(self._out_shape) > 1:
            batch_shape = tuple(ops.shape(inputs))[
                : len(inputs.shape) - in_rank
            ]
        if in_rank > 1:
            inputs = ops.reshape(inputs, batch_shape + (self._in_units,))
        frozen = self._frozen_parts()
        outputs = ops.matmul(inputs, _cast(frozen[0], compute_dtype))
        adapter_inputs = inputs
        if self.dropout:
            adapter_inputs = self.dropout_layer(inputs, training=training)
        lora_a = _cast(self.lora_a.value, compute_dtype)
        lora_b = _cast(self.lora_b.value * self.scale, compute_dtype)
        outputs = outputs + ops.matmul(
            ops.matmul(adapter_inputs, lora_a), lora_b
        )
        if self.use_magnitude:
            scale = self._scale(frozen)
            outputs = outputs * _cast(scale, compute_dtype)
        if len(self._out_shape) > 1:
            outputs = ops.reshape(outputs, batch_shape + self._out_shape)
        return outputs

    def _einsum_call(self, inputs, training, compute_dtype):
        """The same through the wrapped layer's equation, for kernels whose
        axes are not a matrix's in the input and the output."""
        kernel = self._base_kernel(compute_dtype)
        outputs = ops.einsum(self.layer.equation, inputs, kernel)
        adapter_inputs = inputs
        if self.dropout:
            adapter_inputs = self.dropout_layer(inputs, training=training)
        lora_a = _reshape(self.lora_a.value, self._in_shape + (self.rank,))
        lora_b = _reshape(self.lora_b.value, (self.rank,) + self._out_shape)
        # Adapters stay float32 and are cast to the compute dtype only here.
        lora_a = _cast(lora_a, compute_dtype)
        lora_b = _cast(lora_b * self.scale, compute_dtype)
        update = ops.einsum(
            self._up_equation,
            ops.einsum(self._down_equation, adapter_inputs, lora_a),
            lora_b,
        )
        outputs = outputs + update
        if self.use_magnitude:
            scale = _reshape(self.column_scale(), self._out_shape)
            scale = _transpose(scale, self._scale_perm)
            scale = _reshape(scale, self._scale_shape)
            outputs = outputs * _cast(scale, compute_dtype)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.pop("autocast", None)
        return {
            **config,
            "layer": keras.saving.serialize_keras_object(self.layer),
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "detach_norm": self.detach_norm,
            "magnitude": self.use_magnitude,
            "lora_a_initializer": keras.initializers.serialize(
                self.lora_a_initializer
            ),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)


def _cast(x, dtype):
    """`ops.cast(x, dtype)`, or `x` itself when it has that dtype."""
    if keras.backend.standardize_dtype(x.dtype) == dtype:
        return x
    return ops.cast(x, dtype)


def _reshape(x, shape):
    """`ops.reshape(x, shape)`, or `x` itself when it has that shape."""
    if tuple(x.shape) == tuple(shape):
        return x
    return ops.reshape(x, shape)


def _transpose(x, perm):
    """`ops.transpose(x, perm)`, or `x` itself for the identity."""
    if list(perm) == list(range(len(perm))):
        return x
    return ops.transpose(x, perm)


def _check_layer(layer):
    """Raises a `ValueError` naming a layer `BiDoRADense` cannot wrap."""
    if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        raise ValueError(
            "BiDoRADense wraps a keras.layers.Dense or "
            "keras.layers.EinsumDense. Received: "
            f"layer={layer!r} of type {type(layer).__name__}"
        )
    if not layer.built:
        raise ValueError(
            "The wrapped layer must be built (call it once or call "
            f"`build(input_shape)`). Received: layer={layer.name!r}, "
            "which is not built"
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            "The wrapped layer already has Keras's own LoRA enabled. "
            f"Received: layer={layer.name!r}"
        )
    _check_quantization(layer)


def _check_quantization(layer):
    mode = layer.quantization_mode
    if mode is not None:
        check_quantization_mode(
            mode, f"layer={layer.name!r} with quantization_mode={mode!r}"
        )


def float_policy(policy):
    """The name of the float policy with `policy`'s compute and variables.

    A quantized policy computes in its source policy's dtype and keeps its
    float variables in the source's variable dtype (`"int8_from_float32"`,
    `"int4/128_from_mixed_bfloat16"`); its source may itself be a policy
    map's, whose name Keras cannot parse back.
    """
    if policy.compute_dtype == policy.variable_dtype:
        return policy.variable_dtype
    return f"mixed_{policy.compute_dtype}"


def check_quantization_mode(mode, received):
    """Raises a `ValueError` unless `mode` is a supported quantization mode.

    Args:
        mode: a Keras quantization mode (`"int8"`, `"float8"`, ...).
        received: the argument that gave it, for the message
            (`"quantize='float8'"`).
    """
    if mode not in config.QUANTIZATION_MODES:
        raise ValueError(
            "BiDoRADense adapts float kernels and kernels quantized to one "
            f"of {config.QUANTIZATION_MODES}. Received: {received}"
        )


def _check_settings(alpha, dropout):
    """Raises a `ValueError` quoting an invalid alpha or dropout."""
    if alpha is not None and (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ValueError(
            f"alpha must be a positive number. Received: alpha={alpha}"
        )
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not 0 <= dropout < 1
    ):
        raise ValueError(
            f"dropout must be a number in [0, 1). Received: dropout={dropout}"
        )


def adapted_layers(model_or_layers):
    """Lists the `BiDoRADense` layers of a model, layer or list of layers."""
    if isinstance(model_or_layers, BiDoRADense):
        return [model_or_layers]
    if isinstance(model_or_layers, keras.layers.Layer):
        found = []
        for layer in _keras_compat.flatten_layers(
            model_or_layers, include_self=True
        ):
            if isinstance(layer, BiDoRADense) and layer not in found:
                found.append(layer)
        return found
    found = []
    for item in model_or_layers:
        for layer in adapted_layers(item):
            if layer not in found:
                found.append(layer)
    return found


def direction_regularization(model_or_layers):
    """The BiDoRA orthogonality penalty on the normalised directions.

    For each adapted layer, `V = (W0 + s*A@B) / ||W0 + s*A@B||_c` is the
    (in, out) direction matrix with unit columns; the penalty is the mean
    over adapted layers of `||V^T V - I||_F`. The official BiDoRA code adds
    it to the lower-level loss with a coefficient of 1e-5 (or 0).

    Args:
        model_or_layers: a model, a layer, or a list of them; every
            `BiDoRADense` inside is included.

    Returns:
        A float32 scalar tensor.

    Example:

    >>> import keras
    >>> from keras_bidora import BiDoRADense, direction_regularization
    >>> dense = keras.layers.Dense(4)
    >>> dense.build((None, 8))
    >>> penalty = direction_regularization(BiDoRADense(dense, rank=2))
    >>> float(penalty) >= 0
    True
    """
    layers = adapted_layers(model_or_layers)
    if not layers:
        raise ValueError(
            "direction_regularization needs at least one BiDoRADense layer. "
            f"Received: model_or_layers={model_or_layers!r}"
        )
    for layer in layers:
        if layer.lora_a is None:
            layer.build()
    shared = _SharedNorms.covering(*layers)
    penalties = []
    for group in _same_shapes(layers):
        norms = shared.group(group) if shared else _group_norms(group)
        penalties.append(ops.cast(_orthogonality(group, norms), "float32"))
    return ops.mean(ops.concatenate(penalties))


@contextlib.contextmanager
def shared_column_scales(model_or_layers):
    """Computes the column norms of same-shaped adapted layers together.

    Inside the block, each `BiDoRADense` of `model_or_layers` takes its
    column scale `m / ||W0 + s*A@B||_c` from one computation per group of
    layers of one shape, rank, scale and kind (stacked on a leading axis,
    as `direction_regularization` computes its penalty), made the first
    time a layer of the block needs it; `direction_regularization` of the
    same layers reuses those norms. At small shapes on eager torch, where
    each op's dispatch costs more than its arithmetic, this dispatches the
    column norm's ops once per group instead of once per layer. The
    values are those computed layer by layer, to float rounding.

    The adapters' values are read once: don't assign them inside the
    block. Layers not in `model_or_layers` compute their own scales.
    `BiDoRAModel` computes each loss of its train steps, and its
    evaluation and prediction steps, inside such a block.

    Args:
        model_or_layers: a model, a layer, or a list of them.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_bidora import BiDoRADense
    >>> from keras_bidora.layers.bidora_dense import shared_column_scales
    >>> layers = []
    >>> for _ in range(2):
    ...     dense = keras.layers.Dense(4)
    ...     dense.build((None, 8))
    ...     layers.append(BiDoRADense(dense, rank=2))
    >>> x = np.random.rand(3, 8).astype("float32")
    >>> with shared_column_scales(layers):
    ...     together = [layer(x) for layer in layers]
    >>> bool(np.allclose(together[1], layers[1](x), atol=1e-6))
    True
    """
    shared = _SharedNorms(adapted_layers(model_or_layers))
    active = _SharedNorms.active()
    active.append(shared)
    try:
        yield
    finally:
        active.remove(shared)


class _SharedNorms:
    """The stacked column norms of one `shared_column_scales` block."""

    _local = threading.local()

    def __init__(self, layers):
        self.layers = layers
        self._ids = {id(layer) for layer in layers}
        self._groups = {}
        self._scales = {}

    @classmethod
    def active(cls):
        """This thread's open blocks, innermost last.

        Per thread: a `tf.distribute` strategy runs its replicas' steps in
        threads of their own.
        """
        if not hasattr(cls._local, "blocks"):
            cls._local.blocks = []
        return cls._local.blocks

    @classmethod
    def covering(cls, *layers):
        """The innermost open block holding all of `layers`, or None."""
        for shared in reversed(cls.active()):
            if all(id(layer) in shared._ids for layer in layers):
                return shared
        return None

    def group(self, layers):
        """`_group_norms(layers)`, computed once in the block."""
        key = tuple(id(layer) for layer in layers)
        if key not in self._groups:
            self._groups[key] = _group_norms(layers)
        return self._groups[key]

    def column_scale(self, layer):
        """`layer.column_scale()`, from its group's stacked norms.

        The first layer of a group to ask computes the scales of the
        group's built layers that have none yet (a layer may be built by
        its first call, inside the block).
        """
        if id(layer) not in self._scales:
            waiting = [
                other
                for other in self.layers
                if other.use_magnitude
                and other.lora_a is not None
                and id(other) not in self._scales
            ]
            for group in _same_shapes(waiting):
                if any(other is layer for other in group):
                    self._scales.update(self._group_scales(group))
        return self._scales[id(layer)]

    def _group_scales(self, layers):
        norm = ops.sqrt(self.group(layers).parts.norm_squared())
        if layers[0].detach_norm:
            norm = ops.stop_gradient(norm)
        magnitude = ops.stack(
            [
                _reshape(layer.magnitude.value, (layer._out_units,))
                for layer in layers
            ]
        )
        scales = ops.unstack(magnitude / norm, len(layers))
        return {id(layer): scale for layer, scale in zip(layers, scales)}


def _same_shapes(layers):
    """`layers` in groups that one stacked computation can take: the same
    shapes, rank, scale and dtype, with or without magnitude alike, and
    with the norm detached or not alike."""
    groups = {}
    for layer in layers:
        key = (
            layer._in_units,
            layer._out_units,
            layer.rank,
            layer.scale,
            layer.adapter_dtype,
            layer.use_magnitude,
            layer.detach_norm,
        )
        groups.setdefault(key, []).append(layer)
    return list(groups.values())


_GroupNorms = collections.namedtuple("_GroupNorms", "parts base lora_b")


def _group_norms(layers):
    """`_norm_parts` of same-shaped `layers`, stacked on a leading axis,
    with the stacked `W0` and B that the penalty needs besides."""
    base, base_squared = _stacked_frozen(layers)
    lora_a = ops.stack([layer.lora_a.value for layer in layers])
    lora_b = ops.stack([layer.lora_b.value for layer in layers])
    parts = _norm_parts(base, base_squared, lora_a, lora_b, layers[0].scale)
    return _GroupNorms(parts, base, lora_b)


class _NormParts(
    collections.namedtuple(
        "_NormParts", "base_squared update_squared projected gram_a"
    )
):
    """What `_norm_parts` returns."""

    def norm_squared(self):
        """`||W0 + s*A@B||_c ** 2`, at least `epsilon ** 2`."""
        epsilon = keras.config.epsilon()
        return ops.maximum(
            self.base_squared + self.update_squared, epsilon * epsilon
        )


def _norm_parts(base, base_squared, lora_a, lora_b, scale):
    """The pieces of `||W0 + s*A@B||_c ** 2` that no (in, out) matrix holds.

    The squared norm of column j is `||w0_j||^2 + u_j` with
    `u_j = 2 (s W0^T A)_j . b_j + b_j^T (s^2 A^T A) b_j` (`b_j` the j-th
    column of B): the adapters enter only through `s A^T W0` (r, out) and
    `s^2 A^T A` (r, r), so the norm costs O(in * out * rank) in the
    adapters, forward and backward, and no (in, out) temporary.

    Args:
        base: `W0`, (..., in, out); any leading axes are a batch of layers.
        base_squared: its squared column norms, (..., out).
        lora_a: A, (..., in, r).
        lora_b: B, (..., r, out).
        scale: s.

    Returns:
        `_NormParts` of `||w0_j||^2` and `u_j` (..., out), `s A^T W0`
        (..., r, out) and `s^2 A^T A`.
    """
    # u_j = b_j . (2 (s A^T W0)_j + (s^2 A^T A) b_j), with s folded into A.
    scaled_a = lora_a * scale
    scaled_a_t = _swap(scaled_a)
    projected = ops.matmul(scaled_a_t, base)
    gram_a = ops.matmul(scaled_a_t, scaled_a)
    update = ops.sum(
        (2 * projected + ops.matmul(gram_a, lora_b)) * lora_b, axis=-2
    )
    return _NormParts(base_squared, update, projected, gram_a)


def _orthogonality(layers, norms):
    """`||V^T V - I||_F` of each layer, without forming V or `V^T V`.

    `layers` share their shapes, rank and scale (see `_same_shapes`), and
    are computed together, stacked on a leading axis (`norms`, their
    `_group_norms`): at small shapes each op's dispatch costs more than its
    arithmetic.

    With `W = W0 + s*A@B`, `G = W^T W = G0 + Q M Q^T`, where `G0 = W0^T W0`,
    `Q = [s W0^T A, B^T]` (out, 2r) and `M = [[0, I], [I, s^2 A^T A]]`.
    `V^T V = E^(1/2) G E^(1/2)` with `E = diag(e)`, `e_j = 1 / G_jj`, so
    `V^T V - I` is its off-diagonal part, and with `O` the off-diagonal part
    of `G0` and `L = Q M Q^T`:

        ||V^T V - I||_F^2 = e^T (O o O) e + 2 sum(M o (R^T O R))
                            + tr(M K M K) - sum_j (e_j L_jj)^2,

    where `R = E Q` and `K = Q^T E Q` (2r, 2r). `G0` holds no adapter, so
    the backward pass reads (out, out) matrices only in matrix-vector and
    thin matrix products, instead of differentiating an (in, out)
    normalisation and an (out, out) Gram matrix with its elementwise chain.
    Only the last two terms cancel, and they vanish with the update.

    Returns:
        A tensor of shape `(len(layers),)`.
    """
    parts, base, lora_b = norms
    off_diagonal, off_diagonal_squared = _off_diagonal(layers, base)
    inverse = 1 / parts.norm_squared()
    factors = _swap(ops.concatenate([parts.projected, lora_b], axis=-2))
    gram_a = parts.gram_a
    zeros = ops.zeros_like(gram_a)
    identity = zeros + ops.eye(layers[0].rank, dtype=gram_a.dtype)
    middle = ops.concatenate(
        [
            ops.concatenate([zeros, identity], axis=-1),
            ops.concatenate([identity, gram_a], axis=-1),
        ],
        axis=-2,
    )
    weighted = factors * ops.expand_dims(inverse, -1)
    inner = ops.matmul(_swap(factors), weighted)
    base_term = ops.sum(inverse * _matvec(off_diagonal_squared, inverse), -1)
    cross = ops.matmul(_swap(weighted), ops.matmul(off_diagonal, weighted))
    cross = ops.sum(middle * cross, axis=(-2, -1))
    update = ops.matmul(inner, ops.matmul(middle, inner))
    update = ops.sum(middle * update, axis=(-2, -1))
    update = update - ops.sum(ops.square(parts.update_squared * inverse), -1)
    squared = base_term + 2 * cross + update
    epsilon = keras.config.epsilon()
    return ops.sqrt(ops.maximum(squared, epsilon * epsilon))


def _stacked_frozen(layers):
    """The layers' `W0` and its squared column norms, stacked.

    The norms are kept, as `BiDoRADense._frozen_parts` keeps a layer's
    parts, where the backend can tell that no `W0` has changed. `W0` is
    stacked anew on each call (mostly from views of the kernels), so that no
    second copy of the kernels is kept.
    """
    parts = [layer._frozen_parts() for layer in layers]
    base = ops.stack([base for base, _ in parts])

    def compute():
        return ops.stack([squared for _, squared in parts])

    return base, _kept(layers[0], "_group_cache", _group_key(layers), compute)


def _off_diagonal(layers, base):
    """`O`, `W0^T W0` off its diagonal, and `O o O`, for the stacked `W0`
    of `layers` (`base`); kept as `_stacked_frozen` keeps the norms."""

    def compute():
        identity = ops.eye(layers[0]._out_units, dtype=base.dtype)
        off_diagonal = ops.matmul(_swap(base), base) * (1 - identity)
        return off_diagonal, ops.square(off_diagonal)

    key = _group_key(layers)
    return _kept(layers[0], "_off_diagonal_cache", key, compute)


def _group_key(layers):
    """The layers' `_frozen_key`s, or None if one of them is None."""
    keys = tuple(layer._frozen_key() for layer in layers)
    return None if any(key is None for key in keys) else keys


def _kept(owner, name, key, compute):
    """`compute()`, or its earlier result for an equal key.

    The result is kept beside its key in `owner`'s attribute `name`; a None
    key keeps nothing.
    """
    kept = getattr(owner, name)
    if key is not None and kept is not None and kept[0] == key:
        return kept[1]
    value = compute()
    setattr(owner, name, None if key is None else (key, value))
    return value


def _swap(x):
    """`x` with its last two axes swapped."""
    if len(x.shape) == 2:
        # `ops.swapaxes` does not take a `tf.Variable` (`.value` on TF).
        return ops.transpose(x)
    return ops.swapaxes(x, -1, -2)


def _matvec(matrix, vector):
    """`matrix @ vector` over leading batch axes."""
    return ops.squeeze(ops.matmul(matrix, ops.expand_dims(vector, -1)), -1)
