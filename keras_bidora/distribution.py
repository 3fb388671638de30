"""Layouts of the adapter variables under a `keras.distribution` (JAX).

Keras lays out each variable when it is created: `DataParallel` replicates
it, `ModelParallel` looks its path up in the `LayoutMap`. A `LayoutMap`
written for a model (for example KerasHub's `GemmaBackbone.get_layout_map`)
names its kernels, not the adapters `keras_bidora.inject` adds, which would
therefore be replicated. `distribute_adapters` lays each adapter out like
the kernel it adapts, read as the `(in, out)` matrix `BiDoRADense` works
on:

- `lora_a` (`in x rank`) is sharded along the kernel's input side,
- `lora_b` (`rank x out`) along its output side,
- `magnitude` (the kernel's output axes) exactly as those axes.

So the adapter branch `x A B` is partitioned as the frozen `x W0` is (the
same contraction sharded the same way, an output sharded the same way), the
column norm `||W0 + s A B||_c` is computed where its columns live, and the
scale `m / ||.||_c` multiplies the output without moving it. Keras's
optimizers create each slot variable with its model variable's layout, so
both levels' optimizer states follow. The adapters are small (rank x
(in + out) per layer); the point of sharding them is that no step has to
gather or re-shard anything the frozen model does not.

A kernel axis of `BiDoRADense`'s matrix may flatten several kernel axes
(an `EinsumDense` kernel such as `(hidden, heads, head_dim)`); the
flattened axis keeps a mesh axis only when that mesh axis shards the first
kernel axis (of size > 1) of the group and no other axis of the group is
sharded, which is exactly when the flattened blocks are contiguous.
Otherwise that side of the adapter is replicated.
"""

import keras

from keras_bidora import _keras_compat
from keras_bidora.layers.bidora_dense import adapted_layers


def _flat_axis(axes, shape):
    """The mesh axis of a row-major flattening of kernel axes, or None."""
    leading = next((i for i, size in enumerate(shape) if size > 1), None)
    if leading is None:
        return None
    if any(axis is not None for i, axis in enumerate(axes) if i != leading):
        return None
    return axes[leading]


def adapter_axes(layer, kernel_axes):
    """The layout axes of a `BiDoRADense`'s adapters, from its kernel's.

    Args:
        layer: a built `BiDoRADense`.
        kernel_axes: the wrapped kernel's layout, one mesh axis name (or
            `None`) per kernel axis.

    Returns:
        A dict from `"lora_a"`, `"lora_b"` and (with a magnitude)
        `"magnitude"` to a tuple of axes.
    """
    kernel_axes = tuple(kernel_axes)
    num_in = len(layer._in_shape)
    in_axes = [kernel_axes[i] for i in layer._matrix_perm[:num_in]]
    out_axes = [kernel_axes[i] for i in layer._matrix_perm[num_in:]]
    axes = {
        "lora_a": (_flat_axis(in_axes, layer._in_shape), None),
        "lora_b": (None, _flat_axis(out_axes, layer._out_shape)),
    }
    if layer.magnitude is not None:
        axes["magnitude"] = tuple(out_axes)
    return axes


def distribute_adapters(model_or_layers, distribution=None):
    """Lays out each adapter variable like the kernel it adapts.

    Call it after `keras_bidora.inject` and before the optimizer is built
    (`BiDoRAModel` calls it when it is created under a distribution). An
    adapter variable whose path the distribution's `LayoutMap` names keeps
    that layout. Only the JAX backend distributes with
    `keras.distribution`; elsewhere this does nothing.

    Args:
        model_or_layers: a model, a layer or a list of them; every
            `BiDoRADense` inside is laid out.
        distribution: a `keras.distribution.Distribution`; defaults to the
            current one (`keras.distribution.distribution()`).

    Example:

    >>> import keras
    >>> from keras_bidora import BiDoRADense
    >>> from keras_bidora.distribution import adapter_axes
    >>> dense = keras.layers.Dense(16)
    >>> dense.build((None, 8))
    >>> adapter_axes(BiDoRADense(dense, rank=2), (None, "model"))
    {'lora_a': (None, None), 'lora_b': (None, 'model'), 'magnitude': ('model',)}
    """
    distribution = distribution or keras.distribution.distribution()
    if distribution is None or keras.config.backend() != "jax":
        return
    layout_map = _keras_compat.layout_map(distribution)
    for layer in adapted_layers(model_or_layers):
        kernel_layout = distribution.get_variable_layout(layer.layer.kernel)
        for name, axes in adapter_axes(layer, kernel_layout.axes).items():
            variable = getattr(layer, name)
            if layout_map is not None and layout_map[variable.path]:
                continue
            layout = keras.distribution.TensorLayout(
                axes, distribution.device_mesh
            )
            _keras_compat.set_variable_layout(variable, layout)
            # The JAX variable re-distributes its value on assignment.
            variable.assign(variable.value)
