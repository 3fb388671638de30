"""Every private Keras attribute keras_bidora touches, in one place.

Keras has no public way to put a layer in another's place in a built model,
to lay out a variable after it is made, or to build a model for training
from a batch of its own choosing; keras_bidora does all three, through the
small functions below. Each says why it needs the private attribute and
where Keras itself does the same. Nothing else in the package reads,
writes or overrides a private Keras attribute.

`check()` builds small real objects and verifies that each attribute is
still there and still of the expected kind; `tests/test_keras_compat.py`
runs it, so that a Keras upgrade that removes or changes one fails with a
message naming it. `pyproject.toml` bounds keras and keras-hub to the minor
versions below, the ones the tests ran on.
"""

import contextlib
import inspect

import keras

# The minor versions the tests ran on; pyproject.toml bounds the
# dependencies to them.
TESTED_KERAS = "3.15"
TESTED_KERAS_HUB = "0.32"

# The private methods of Keras's trainers that `BiDoRAModel` overrides: the
# backends whose trainer defines them, and the keywords Keras calls them
# with. Keras's TensorFlow trainer (keras/src/backend/tensorflow/trainer.py)
# builds the model from the first batch of `fit`, `evaluate` and
# `train_on_batch` in `_maybe_symbolic_build`; `BiDoRAModel` skips it for
# its bi-level batches and builds from a lower batch instead.
OVERRIDDEN_METHODS = {
    "_maybe_symbolic_build": (("tensorflow",), ("iterator", "data_batch")),
}


# Layers --------------------------------------------------------------------


def flatten_layers(layer, include_self=False):
    """Every sublayer of `layer`, depth first, each once.

    `Layer._flatten_layers` is how Keras walks a model (`Trainer`'s
    `_symbolic_build`) and how KerasHub's `Backbone.enable_lora` finds the
    layers to adapt; the public `Model.layers` lists only direct children.
    """
    return list(layer._flatten_layers(include_self=include_self))


def direct_sublayers(layer):
    """The layers `layer` tracks directly, in the order of its weights.

    `Layer._layers` is the list `_flatten_layers` walks; unlike the public
    `Model.layers`, every layer has it, and it keeps a layer shared by two
    parents under each of them.
    """
    return layer._layers


def set_parent_path(layer, path):
    """Makes `layer.build` create its variables under `path`.

    `Layer._parent_path` is the name scope Keras records when a layer is
    first called inside its parent (`Layer._open_name_scope`); a layer
    built outside its parent's call needs it set by hand to get the
    variable paths it would have had there.
    """
    layer._parent_path = path


@contextlib.contextmanager
def unlocked_tracker(layer):
    """Lets `layer` take new state after it was built.

    Keras locks a built layer's `_tracker`; `Dense.enable_lora`
    (keras/src/layers/core/dense.py) unlocks it to add its LoRA variables
    and locks it again, as this does around the `with` block.
    """
    tracker = layer._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if locked:
            tracker.lock()


def replace_tracked_layer(layer, old, new):
    """Puts `new` in `old`'s place in the sublayers `layer` tracks.

    Use inside `unlocked_tracker(layer)`. `Tracker.replace_tracked_value`
    is how Keras itself swaps a tracked value in place, which keeps the
    order of `layer.weights`.
    """
    tracker = layer._tracker
    if tracker.is_in_store("layers", old):
        tracker.replace_tracked_value("layers", old, new)


def replace_in_graph(old, new):
    """Puts layer `new` in `old`'s place in the functional graphs `old` is in.

    A functional model calls the `operation` of each `Node` of its graph;
    the `KerasTensor`s it made record their producer in `_keras_history`,
    and each operation its nodes in `_inbound_nodes` and `_outbound_nodes`
    (keras/src/ops/node.py sets all three).
    """
    for node in old._inbound_nodes:
        node.operation = new
        for tensor in node.outputs:
            history = getattr(tensor, "_keras_history", None)
            if history is not None and history.operation is old:
                tensor._keras_history = history._replace(operation=new)
    if old._inbound_nodes:
        new._inbound_nodes = list(old._inbound_nodes)
        new._outbound_nodes = list(old._outbound_nodes)


def retrack_torch_variables(layer):
    """Refreshes the torch parameters a layer caches (torch backend).

    Keras's torch layers (keras/src/backend/torch/layer.py) keep a
    `ParameterDict` of the variables of their whole subtree, taken when
    they are built, which `Model.parameters()` reads; `_track_variables`
    takes it again. Keras layers register it as a torch submodule; KerasHub
    models keep it as a plain attribute (their `__setattr__` bypasses
    torch's module registry): each stays where it was.
    """
    import torch

    if "_torch_params" in vars(layer):
        params = torch.nn.ParameterDict(
            {variable.path: variable.value for variable in layer.variables}
        )
        object.__setattr__(layer, "_torch_params", params)
    elif "_torch_params" in vars(layer).get("_modules", {}):
        layer._track_variables()


# Quantization --------------------------------------------------------------


def dequantized_kernel(layer, dtype):
    """The float kernel of an int8 or int4 `Dense`/`EinsumDense`, in `dtype`.

    Keras stores a quantized kernel `W0` as integers `q` and a
    `kernel_scale`, and dequantizes it as its own LoRA merge does
    (`_get_kernel_with_merged_lora` in keras/src/layers/core/dense.py and
    einsum_dense.py): int8 and per-channel int4 as `q / kernel_scale`,
    sub-channel int4 (a block size) as `(q - kernel_zero) * kernel_scale`
    per group of rows, `g_idx` naming each row's group. The public `kernel`
    property gives `q` unpacked, in the kernel's shape; an int4
    `EinsumDense` quantizes it as a `(rows, columns)` matrix with one
    scale per column, and an int8 `EinsumDense` keeps its scale in a layout
    that `_adjust_scale_for_dequant` turns back into the kernel's.

    Args:
        layer: a built `Dense` or `EinsumDense` quantized to int8 or int4.
        dtype: the float dtype to return.

    Returns:
        A tensor of the float kernel's shape.
    """
    values = keras.ops.cast(layer.kernel, dtype)
    scale = keras.ops.cast(layer.kernel_scale, dtype)
    shape = tuple(values.shape)
    if layer.quantization_mode == "int8":
        if isinstance(layer, keras.layers.EinsumDense):
            scale = layer._adjust_scale_for_dequant(scale)
        return values / scale
    # int4: one column per entry of the scale's last axis.
    values = keras.ops.reshape(values, (-1, scale.shape[-1]))
    if getattr(layer, "_int4_block_size", None) in (None, -1):
        return keras.ops.reshape(values / scale, shape)
    groups = keras.ops.cast(layer.g_idx, "int32")
    zero = keras.ops.cast(layer.kernel_zero, dtype)
    values = (values - keras.ops.take(zero, groups, axis=0)) * keras.ops.take(
        scale, groups, axis=0
    )
    return keras.ops.reshape(values, shape)


# Distribution --------------------------------------------------------------


def layout_map(distribution):
    """The `LayoutMap` of a `ModelParallel` distribution, else `None`.

    `ModelParallel` keeps it in `_layout_map` and reads it in
    `get_variable_layout`; it has no public accessor.
    """
    return getattr(distribution, "_layout_map", None)


def set_variable_layout(variable, layout):
    """Gives a created variable a new `TensorLayout` (JAX backend).

    Keras has no public way to change a variable's layout once it is made:
    `Variable._layout` is what `ModelParallel.get_variable_layout` returns
    first, what the JAX variable distributes its value with on the next
    `assign`, and what the optimizers copy when they create their slot
    variables.
    """
    variable._layout = layout


# Training ------------------------------------------------------------------


def default_optimizer(multi_optimizer):
    """The optimizer a `MultiOptimizer` applies to unmapped variables.

    `MultiOptimizer` keeps its `OptimizerMap` in `_optimizer_map`, with no
    public accessor; `BiDoRAModel` compiles one with the lower level's
    optimizer as the default.
    """
    return multi_optimizer._optimizer_map.default_optimizer


def learning_rate_variable(optimizer):
    """The variable holding `optimizer`'s learning rate, or `None`.

    `Optimizer._learning_rate` is that variable for a constant learning
    rate, and a schedule or a callable otherwise (the public
    `learning_rate` property returns its current value, not the variable).
    """
    learning_rate = optimizer._learning_rate
    if isinstance(learning_rate, keras.Variable):
        return learning_rate
    return None


def symbolic_build(model, data_batch):
    """Builds the model, its compiled loss, metrics and optimizer.

    `Trainer._symbolic_build` (keras/src/trainers/trainer.py) is how `fit`
    builds them all from its first batch; `BiDoRAModel` builds them from a
    lower batch rather than from its bi-level batches.
    """
    model._symbolic_build(data_batch=data_batch)


def aggregate_additional_loss(model, loss):
    """Scales an extra loss term as Keras scales regularization losses.

    `Trainer._aggregate_additional_loss` sums the term and, under a
    `tf.distribute` strategy, divides it by the number of replicas, as the
    losses of `add_loss` and of regularizers.
    """
    return model._aggregate_additional_loss(loss)


def loss_tracker(model):
    """The `Mean` metric that reports a compiled model's `loss`.

    `Trainer._loss_tracker` is what Keras's train steps update; a custom
    train step must update it for `fit` to report the loss.
    """
    return model._loss_tracker


# Checks --------------------------------------------------------------------


def check():
    """Verifies that this Keras has every private attribute used above.

    Builds a tiny functional model, compiles it, builds an `AdamW` and a
    `MultiOptimizer` on a variable, and checks each private attribute the
    package reads, writes or overrides, on the current backend.

    Raises:
        RuntimeError: naming the first attribute that is missing or has
            changed, this Keras version and the versions keras-bidora was
            tested with.
    """
    backend = keras.config.backend()
    # Explicit names leave Keras's automatic layer names unchanged.
    inputs = keras.Input((3,), name="bidora_check_input")
    dense = keras.layers.Dense(2, name="bidora_check_dense")
    outputs = dense(inputs)
    model = keras.Model(inputs, outputs, name="bidora_check_model")

    _check_layers(model, dense, outputs, backend)
    _check_trainer(model, backend)
    _check_optimizers()
    _check_quantization()


def _check_layers(model, dense, outputs, backend):
    _require(
        keras.layers.Layer,
        "Layer._flatten_layers",
        "to list every sublayer of a model, as KerasHub's enable_lora does",
        keywords=("include_self",),
    )
    if dense not in flatten_layers(model):
        raise _changed(
            "Layer._flatten_layers",
            "to list every sublayer of a model",
            "it no longer lists a functional model's layers",
        )
    layers = _require(
        model, "Layer._layers", "to list a layer's direct sublayers"
    )
    if dense not in list(layers):
        raise _changed(
            "Layer._layers",
            "to list a layer's direct sublayers",
            "it no longer holds a functional model's layers",
        )
    _check_parent_path()
    tracker = _require(
        model,
        "Layer._tracker",
        "to put an adapter in a built layer's place, as Keras's "
        "Dense.enable_lora adds variables to a built layer",
    )
    for name in ("unlock", "lock", "is_in_store", "replace_tracked_value"):
        _require(
            tracker,
            f"Layer._tracker.{name}",
            "to put an adapter in a built layer's place",
            callable,
        )
    _require(tracker, "Layer._tracker.locked", "to restore a tracker's lock")
    _check_graph(dense, outputs)
    if backend == "torch":
        _check_torch_parameters(dense)
    if backend == "jax":
        _check_layout()


def _check_trainer(model, backend):
    _require(
        keras.Model,
        "Model._symbolic_build",
        "to build a model for training from a batch of its choosing",
        keywords=("data_batch",),
    )
    _require(
        keras.Model,
        "Model._aggregate_additional_loss",
        "to scale the direction regularization as Keras's regularizers",
        callable,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(name="bidora_check_sgd"), loss="mse"
    )
    _require(
        model,
        "Model._loss_tracker",
        "to report the loss of BiDoRAModel's train step",
        keras.metrics.Mean,
    )
    for name, (backends, keywords) in OVERRIDDEN_METHODS.items():
        if backend in backends:
            _require(
                keras.Model,
                f"Model.{name}",
                "which BiDoRAModel overrides",
                keywords=keywords,
            )


def _check_optimizers():
    variable = keras.Variable(
        [1.0, 2.0], name="bidora_check_variable", dtype="float32"
    )
    lower = keras.optimizers.AdamW(1e-3, name="bidora_check_lower")
    upper = keras.optimizers.AdamW(1e-3, name="bidora_check_upper")
    multi = keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(lower, {variable.path: upper}),
        name="bidora_check_multi",
    )
    multi.build([variable])
    optimizer_map = _require(
        multi,
        "MultiOptimizer._optimizer_map",
        "to find BiDoRAModel's lower-level optimizer",
    )
    if getattr(optimizer_map, "default_optimizer", None) is not lower:
        raise _changed(
            "MultiOptimizer._optimizer_map",
            "to find BiDoRAModel's lower-level optimizer",
            "its `default_optimizer` is not the default optimizer",
        )
    _require(
        lower,
        "Optimizer._learning_rate",
        "to keep the learning rate when resetting an optimizer's state",
        keras.Variable,
    )


def _check_quantization():
    purpose = "to dequantize an int8 or int4 kernel inside BiDoRADense"
    einsum = keras.layers.EinsumDense(
        "ab,bc->ac", (4,), name="bidora_check_einsum"
    )
    dense = keras.layers.Dense(4, name="bidora_check_int4")
    for layer, mode in ((einsum, "int8"), (dense, "int4")):
        layer.build((None, 3))
        kernel = keras.ops.convert_to_tensor(layer.kernel)
        layer.quantize(mode)
        if mode == "int4":
            _require(layer, "Dense._int4_block_size", purpose)
        else:
            _require(
                layer,
                "EinsumDense._adjust_scale_for_dequant",
                purpose,
                callable,
            )
        error = keras.ops.max(
            keras.ops.abs(dequantized_kernel(layer, "float32") - kernel)
        )
        # int4 keeps 16 levels: a step is at most 1/7 of the largest value.
        if float(error) > float(keras.ops.max(keras.ops.abs(kernel))) / 7:
            raise _changed(
                f"{type(layer).__name__}.kernel_scale",
                purpose,
                f"dequantizing a {mode} kernel no longer gives it back",
            )


def _check_parent_path():
    purpose = "to create adapter variables under the adapted layer's parent"
    layer = keras.layers.Dense(1, name="bidora_check_path")
    _require(layer, "Layer._parent_path", purpose)
    set_parent_path(layer, "bidora_check_parent")
    layer.build((None, 1))
    if layer.kernel.path != "bidora_check_parent/bidora_check_path/kernel":
        raise _changed(
            "Layer._parent_path",
            purpose,
            "`build` no longer creates the variables under it",
        )


def _check_graph(dense, outputs):
    purpose = "to put an adapter in a layer's place in a functional model"
    nodes = _require(dense, "Operation._inbound_nodes", purpose)
    _require(dense, "Operation._outbound_nodes", purpose)
    if not nodes:
        raise _changed(
            "Operation._inbound_nodes",
            purpose,
            "it is empty for a layer called in a functional model",
        )
    _require(nodes[0], "Node.operation", purpose)
    _require(nodes[0], "Node.outputs", purpose)
    history = _require(outputs, "KerasTensor._keras_history", purpose)
    if getattr(history, "operation", None) is not dense or not hasattr(
        history, "_replace"
    ):
        raise _changed(
            "KerasTensor._keras_history",
            purpose,
            "it is no longer a named tuple whose `operation` is the layer",
        )


def _check_torch_parameters(dense):
    purpose = "to make torch see the adapter variables of an injected model"
    _require(dense, "TorchLayer._track_variables", purpose, callable)
    dense._track_variables()
    if "_torch_params" not in vars(dense).get("_modules", {}):
        raise _changed(
            "TorchLayer._torch_params",
            purpose,
            "`_track_variables` no longer registers it as a submodule",
        )


def _check_layout():
    devices = keras.distribution.list_devices()[:1]
    mesh = keras.distribution.DeviceMesh((1,), ["model"], devices)
    layouts = keras.distribution.LayoutMap(mesh)
    distribution = keras.distribution.ModelParallel(layout_map=layouts)
    purpose = "to lay out the adapter variables like the kernels they adapt"
    if layout_map(distribution) is not layouts:
        raise _missing("ModelParallel._layout_map", purpose)
    variable = keras.Variable(1.0, name="bidora_check_layout")
    _require(variable, "Variable._layout", purpose)


def _require(obj, name, purpose, kind=None, keywords=()):
    """`obj.<attribute>`, the last part of `name`, checked.

    Args:
        obj: the object or class that should have the attribute.
        name: the attribute as the message names it (`"Layer._tracker"`).
        purpose: why keras_bidora needs it, for the message.
        kind: `callable`, a type the value must be an instance of, or
            `None` for any value.
        keywords: keyword arguments the (callable) value must accept.
    """
    attribute = name.rpartition(".")[2]
    if not hasattr(obj, attribute):
        raise _missing(name, purpose)
    value = getattr(obj, attribute)
    if kind is callable or keywords:
        if not callable(value):
            raise _changed(name, purpose, "it is no longer callable")
    elif kind is not None and not isinstance(value, kind):
        raise _changed(
            name,
            purpose,
            f"it is a {type(value).__name__}, not a {kind.__name__}",
        )
    if keywords:
        parameters = inspect.signature(value).parameters
        missing = [k for k in keywords if k not in parameters]
        if missing:
            raise _changed(
                name,
                purpose,
                f"it no longer takes {', '.join(missing)} (its signature "
                f"is {inspect.signature(value)})",
            )
    return value


def _missing(name, purpose):
    return RuntimeError(
        f"keras_bidora needs the private Keras attribute `{name}` "
        f"({purpose}), which Keras {keras.__version__} does not have; "
        f"{_tested()}"
    )


def _changed(name, purpose, change):
    return RuntimeError(
        f"keras_bidora needs the private Keras attribute `{name}` "
        f"({purpose}), which Keras {keras.__version__} has changed: "
        f"{change}; {_tested()}"
    )


def _tested():
    return (
        f"keras-bidora was tested with keras {TESTED_KERAS}.x and "
        f"keras-hub {TESTED_KERAS_HUB}.x."
    )
