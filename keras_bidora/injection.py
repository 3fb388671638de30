"""Injecting BiDoRA adapters into Keras and KerasHub models."""

import copy
import json
import math
import re

import keras

from keras_bidora import _keras_compat
from keras_bidora import config
from keras_bidora.checks import check_count
from keras_bidora.layers.bidora_dense import BiDoRADense
from keras_bidora.layers.bidora_dense import adapted_layers

# KerasHub's `Backbone.default_lora_layer_names()` (query and value of the
# attention), the names its vision towers add (`query_proj`, `value_proj`)
# and those of `RoformerAttention`, which ESM uses (`q_dense_layer`,
# `v_dense_layer`) and which KerasHub's own default misses.
DEFAULT_TARGETS = (
    "query_dense",
    "value_dense",
    "query",
    "value",
    "query_proj",
    "value_proj",
    "q_dense_layer",
    "v_dense_layer",
)

_ADAPTED_TYPES = (keras.layers.Dense, keras.layers.EinsumDense)
_STATE_ATTRIBUTE = "_keras_bidora_injection"
_RESERVED_LAYER_KWARGS = ("layer", "name")


class _Injection:
    """What `inject` did to a model: its settings, config and paths."""

    def __init__(self, settings, model_config, config_error, paths):
        self.settings = settings
        self.model_config = model_config
        self.config_error = config_error
        self.paths = paths


def inject(
    model,
    rank=config.RANK,
    alpha=None,
    targets=None,
    dropout=config.DROPOUT,
    **kwargs,
):
    """Replaces a model's `Dense`/`EinsumDense` layers by `BiDoRADense`.

    Each adapted layer is wrapped in a `BiDoRADense` that takes its place
    wherever the model keeps it (an attribute, a list, a node of a
    functional graph), so that the model computes the same outputs as
    before until the adapters train. Everything else is frozen the way
    KerasHub's `Backbone.enable_lora` freezes a backbone: the top model stays
    trainable, its sublayers do not, and only the adapter variables
    (`magnitude`, `lora_a`, `lora_b`) train. For a KerasHub task (a model
    with a `backbone`), only the backbone is frozen, so that the task's own
    head keeps training.

    The model keeps its settings and its config from before the injection
    (see `injection_config`), from which `keras_bidora.BiDoRAModel` saves
    and rebuilds it. The model itself refuses to be saved with
    `model.save`: its config would describe a model without adapters.

    Compile the model after injecting, so that the optimizer sees the new
    variables.

    Args:
        model: a built `keras.Model` (a KerasHub backbone or task, a
            functional or subclassed model).
        rank: int >= 1, the rank of each adapter.
        alpha: positive float, the scale numerator (`s = alpha / rank`).
            Defaults to `2 * rank` (see `keras_bidora.config`).
        targets: the layers to adapt: a list of layer names or of regular
            expressions, each matched against the end of the layer paths
            at a `/` boundary (`"query"` matches
            `transformer_layer_0/self_attention_layer/query`, and
            `"transformer_layer_0/.*/value"` only the first block's
            value). Defaults to the backbone's
            `default_lora_layer_names()` and `DEFAULT_TARGETS`, the query
            and value projections KerasHub's LoRA adapts.
        dropout: float in [0, 1), dropout on the adapters' input.
        **kwargs: further `BiDoRADense` arguments (`detach_norm`,
            `magnitude`, `lora_a_initializer`).

    Returns:
        The paths of the adapted layers, in the model's layer order.

    Raises:
        ValueError: if the model is not built or already injected, if a
            target matches no `Dense`/`EinsumDense` layer (the message
            lists the candidate paths), or if an argument is invalid. The
            model is left unchanged.

    Example:

    >>> import keras_hub
    >>> import keras_bidora
    >>> backbone = keras_hub.models.BertBackbone(
    ...     vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, max_sequence_length=8)
    >>> keras_bidora.inject(backbone, rank=4)[:2]
    ['transformer_layer_0/self_attention_layer/query', \
'transformer_layer_0/self_attention_layer/value']
    """
    _check_injectable(model, kwargs)
    rank = check_count("rank", rank, 1)
    layer_kwargs = {key: _serializable(value) for key, value in kwargs.items()}
    layers, parents = _walk(model)
    candidates = [
        (_layer_path(layer), layer)
        for layer in layers
        if isinstance(layer, _ADAPTED_TYPES)
    ]
    others = [
        (_layer_path(layer), layer)
        for layer in layers
        if not isinstance(layer, _ADAPTED_TYPES) and layer.path is not None
    ]
    selected = _select(model, targets, candidates, others)
    # Build every adapter before touching the model, so that an invalid
    # argument or an unsupported layer leaves it unchanged.
    wrappers = _wrappers(selected, rank, alpha, dropout, layer_kwargs)
    _check_unique_paths(model, selected, wrappers)
    model_config, config_error = _model_config(model)

    _freeze(model)
    for (path, layer), wrapper in zip(selected, wrappers):
        _swap_layer(layer, wrapper, parents[id(layer)], path)
    if keras.config.backend() == "torch":
        _retrack_torch_parameters(model)

    paths = [path for path, _ in selected]
    settings = {
        "rank": rank,
        # Resolved, so that a saved config keeps its scale if the default
        # changes.
        "alpha": wrappers[0].alpha if wrappers else alpha,
        "targets": None if targets is None else _target_list(targets),
        "dropout": dropout,
        **layer_kwargs,
    }
    state = _Injection(settings, model_config, config_error, paths)
    # Plain attributes: Keras and TensorFlow would otherwise track them.
    object.__setattr__(model, _STATE_ATTRIBUTE, state)
    for layer in [model] + _ancestors(
        [layer for _, layer in selected], parents
    ):
        if isinstance(layer, keras.Model):
            _refuse_serialization(layer)
    return list(paths)


def _check_injectable(model, kwargs):
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            "inject needs a Keras model. Received: "
            f"model={model!r} of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            "The model must be built before injecting adapters (call it "
            f"once or call `build`). Received: model={model.name!r}, which "
            "is not built"
        )
    if getattr(model, _STATE_ATTRIBUTE, None) is not None or adapted_layers(
        model
    ):
        raise ValueError(
            "The model already has BiDoRA adapters: inject only once. "
            f"Received: model={model.name!r}"
        )
    for key in _RESERVED_LAYER_KWARGS:
        if key in kwargs:
            raise ValueError(
                f"inject sets each adapter's `{key}` itself. Received: "
                f"{key}={kwargs[key]!r}"
            )


def _wrappers(selected, rank, alpha, dropout, layer_kwargs):
    """One `BiDoRADense` per selected `(path, layer)`, not yet swapped in."""
    wrappers = []
    for path, layer in selected:
        try:
            wrapper = BiDoRADense(
                layer, rank=rank, alpha=alpha, dropout=dropout, **layer_kwargs
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"Cannot adapt layer '{path}': {error}") from None
        wrappers.append(wrapper)
    return wrappers


def _model_config(model):
    """`(config, None)`, or `(None, error)` if the model does not serialize."""
    try:
        model_config = keras.saving.serialize_keras_object(model)
        # The structure, not the training setup: the copy is compiled by
        # whoever rebuilds it.
        model_config.pop("compile_config", None)
        json.dumps(model_config)
        return model_config, None
    except (NotImplementedError, TypeError, ValueError) as error:
        # The model still trains; only BiDoRAModel's saving needs it.
        return None, error


def _freeze(model):
    """Freezes the backbone (or the whole model), as `enable_lora` does."""
    model.trainable = True
    frozen = getattr(model, "backbone", None)
    if not isinstance(frozen, keras.layers.Layer):
        frozen = model
    for layer in _walk(frozen)[0]:
        layer.trainable = False


def injection_config(model):
    """The settings and pre-injection config that rebuild an injected model.

    `keras.saving.deserialize_keras_object(config.pop("model"))` rebuilds
    the model as it was before `inject`, and `inject(model, **config)` then
    gives it the same adapters, with the same variable paths.

    Args:
        model: a model returned by `inject`, or a `BiDoRAModel`.

    Returns:
        A dict with the `inject` arguments (`rank`, `alpha`, `targets`,
        `dropout` and any further `BiDoRADense` arguments) and `"model"`,
        the serialized model from before the injection. A fresh copy: it
        can be changed freely.
    """
    state = _injection_state(model)
    if state.model_config is None:
        raise ValueError(
            "The model could not be serialized before the injection, so it "
            f"cannot be rebuilt from a config: {state.config_error}"
        )
    return copy.deepcopy({**state.settings, "model": state.model_config})


def adapted_paths(model):
    """The paths of the layers `inject` adapted, in the model's order."""
    return list(_injection_state(model).paths)


def summary(model):
    """A one-line count of the adapted layers and trainable parameters.

    Like PEFT's `print_trainable_parameters`, as a string.

    Args:
        model: a Keras model, injected or not, or a `BiDoRAModel`.

    Returns:
        A string such as `"adapted 12 layers | trainable params: 74,496 ||
        all params: 22,787,712 || trainable%: 0.33"`.
    """
    model = injected_model(model)
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    total = sum(math.prod(w.shape) for w in model.weights)
    count = len(adapted_layers(model))
    percent = 100 * trainable / total if total else 0.0
    return (
        f"adapted {count} layer{'' if count == 1 else 's'} | "
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {percent:.2f}"
    )


def quantized_layers(model):
    """How each quantized layer of a model is quantized, by layer path.

    A model quantized after `inject` (`backbone.quantize("int8")`) no longer
    matches the config `inject` recorded; `BiDoRAModel` saves this beside
    it and `quantize_layers` quantizes the rebuilt model the same way.

    Args:
        model: a Keras model, injected or not.

    Returns:
        A dict from layer path to `{"mode": ..., "block_size": ...}`, the
        block size being that of an int4 policy (`None` otherwise). Each
        adapted layer is listed under its own path.
    """
    found = {}
    for layer in _walk(model)[0]:
        mode = layer.quantization_mode
        if mode is not None and not isinstance(layer, BiDoRADense):
            found[_layer_path(layer)] = {
                "mode": mode,
                "block_size": getattr(layer.dtype_policy, "block_size", None),
            }
    return found


def quantize_layers(model, quantization):
    """Quantizes a model's layers as `quantized_layers` described them.

    Layers already quantized (a KerasHub backbone rebuilt from a config with
    its `DTypePolicyMap`) are left as they are.

    Args:
        model: a built Keras model, not injected.
        quantization: a dict returned by `quantized_layers`.
    """
    groups = {}
    for path, setting in quantization.items():
        key = (setting["mode"], setting.get("block_size"))
        groups.setdefault(key, set()).add(path)
    for (mode, block_size), paths in groups.items():
        quantization_config = None
        if mode == "int4":
            quantization_config = keras.quantizers.Int4QuantizationConfig(
                block_size=-1 if block_size is None else block_size
            )
        model.quantize(
            mode,
            config=quantization_config,
            filters=lambda layer, paths=paths: (
                layer.quantization_mode is None and _layer_path(layer) in paths
            ),
        )


def injected_model(model):
    """Returns `model`, or a `BiDoRAModel`'s injected `.model`."""
    if getattr(model, _STATE_ATTRIBUTE, None) is None:
        inner = getattr(model, "model", None)
        if getattr(inner, _STATE_ATTRIBUTE, None) is not None:
            return inner
    return model


def is_injected(model):
    """Whether `inject` adapted `model` (or a `BiDoRAModel`'s `.model`)."""
    return getattr(injected_model(model), _STATE_ATTRIBUTE, None) is not None


def _injection_state(model):
    state = getattr(injected_model(model), _STATE_ATTRIBUTE, None)
    if state is None and adapted_layers(getattr(model, "model", model)):
        raise ValueError(
            "The model's BiDoRADense layers were built by hand, not by "
            "keras_bidora.inject, so it has no pre-injection config to "
            "merge or rebuild from: adapt it with inject for that. "
            f"Received: model={getattr(model, 'name', model)!r}"
        )
    if state is None:
        raise ValueError(
            "The model has no BiDoRA adapters: call keras_bidora.inject "
            f"first. Received: model={getattr(model, 'name', model)!r}"
        )
    return state


def _serializable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_serializable(item) for item in value]
    if isinstance(value, dict):
        return {key: _serializable(item) for key, item in value.items()}
    return keras.saving.serialize_keras_object(value)


def _layer_path(layer):
    return layer.path if layer.path is not None else layer.name


def _target_list(targets):
    if isinstance(targets, str):
        targets = [targets]
    try:
        targets = list(targets)
    except TypeError:
        targets = None
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            "targets must be a non-empty list of layer names or regular "
            f"expressions. Received: targets={targets!r}"
        )
    return targets


def _compile_target(target):
    try:
        # A name or pattern matches the end of a path at a `/` boundary.
        return re.compile(rf"(?:^|/)(?:{target})$")
    except re.error as error:
        raise ValueError(
            f"Target {target!r} is not a valid regular expression: {error}"
        ) from None


def _select(model, targets, candidates, others):
    listing = "\n".join(
        f"  {path} ({type(layer).__name__})" for path, layer in candidates
    )
    listing = listing or "  (none)"
    if targets is None:
        backbone = getattr(model, "backbone", model)
        names = []
        if hasattr(backbone, "default_lora_layer_names"):
            names = list(backbone.default_lora_layer_names())
        names += [name for name in DEFAULT_TARGETS if name not in names]
        patterns = [_compile_target(re.escape(name)) for name in names]
        selected = [
            (path, layer)
            for path, layer in candidates
            if any(p.search(path) for p in patterns)
        ]
        if not selected:
            raise ValueError(
                f"No layer of model {model.name!r} has one of the default "
                f"target names {names}. Pass `targets`: names or regular "
                "expressions matching some of these Dense/EinsumDense "
                f"layer paths:\n{listing}"
            )
        return selected
    selected_ids = set()
    for target in _target_list(targets):
        pattern = _compile_target(target)
        matched = [layer for path, layer in candidates if pattern.search(path)]
        if not matched:
            wrong_kind = [
                f"{path} ({type(layer).__name__})"
                for path, layer in others
                if pattern.search(path)
            ]
            if wrong_kind:
                raise ValueError(
                    f"Target {target!r} names layers that are not Dense or "
                    f"EinsumDense: {', '.join(wrong_kind)}. Candidate "
                    f"Dense/EinsumDense layer paths:\n{listing}"
                )
            raise ValueError(
                f"Target {target!r} matches no layer of model "
                f"{model.name!r}. Candidate Dense/EinsumDense layer "
                f"paths:\n{listing}"
            )
        selected_ids.update(id(layer) for layer in matched)
    return [
        (path, layer) for path, layer in candidates if id(layer) in selected_ids
    ]


def _check_unique_paths(model, selected, wrappers):
    existing = {variable.path for variable in model.variables}
    seen = set()
    clashes = []
    for (path, _), wrapper in zip(selected, wrappers):
        names = ["lora_a", "lora_b"]
        if wrapper.use_magnitude:
            names.append("magnitude")
        for name in names:
            variable_path = f"{path}/{name}"
            if variable_path in existing or variable_path in seen:
                clashes.append(variable_path)
            seen.add(variable_path)
    if clashes:
        raise ValueError(
            "Adapter variable paths must be unique, but these would clash "
            f"with other variables of model {model.name!r}: {clashes}. "
            "Give the layers distinct names or select fewer of them with "
            "`targets`."
        )


def _walk(model):
    """The sublayers of `model` in depth-first order, and their parents.

    Returns:
        `(layers, parents)`: each sublayer once, in the order of
        `model.weights`, and a dict from `id(layer)` to the list of layers
        holding it.
    """
    layers = []
    parents = {}

    def visit(layer):
        for child in _keras_compat.direct_sublayers(layer):
            holders = parents.setdefault(id(child), [])
            if layer not in holders:
                holders.append(layer)
            if len(holders) == 1:
                layers.append(child)
                visit(child)

    visit(model)
    return layers, parents


def _ancestors(layers, parents):
    """The layers holding one of `layers`, directly or further down."""
    found = {}
    queue = [parent for layer in layers for parent in parents[id(layer)]]
    while queue:
        layer = queue.pop()
        if id(layer) not in found:
            found[id(layer)] = layer
            queue.extend(parents.get(id(layer), []))
    return list(found.values())


def _refuse_serialization(model):
    def refuse(*args, **kwargs):
        raise ValueError(
            f"Model {model.name!r} has BiDoRA adapters injected by "
            "keras_bidora.inject; its config describes the model without "
            "them, so it cannot be saved or serialized directly (the file "
            "would reload without its adapters). Wrap it in "
            "keras_bidora.BiDoRAModel to save it with its adapters, save "
            "keras_bidora.merge(model), a plain model with the adapters "
            "merged into its kernels, or save only the adapters with "
            "keras_bidora.save_adapter_weights(model, path)."
        )

    # Instance attributes shadow the methods; `object.__setattr__` keeps
    # Keras and TensorFlow from tracking them.
    object.__setattr__(model, "get_config", refuse)
    object.__setattr__(model, "save", refuse)
    object.__setattr__(model, "to_json", refuse)


def _swap_layer(layer, wrapper, parents, path):
    """Builds `wrapper` in `layer`'s scope and puts it in `layer`'s place.

    Keras has no public way to replace a sublayer of a built model; the
    private bookkeeping this needs is in `_keras_compat`.
    """
    _keras_compat.set_parent_path(wrapper, path.rpartition("/")[0])
    build_config = layer.get_build_config() or {}
    wrapper.build(build_config.get("input_shape"))
    for parent in parents:
        with _keras_compat.unlocked_tracker(parent):
            _keras_compat.replace_tracked_layer(parent, layer, wrapper)
            for name, value in list(vars(parent).items()):
                if value is layer:
                    setattr(parent, name, wrapper)
                else:
                    replaced = _replace_in(value, layer, wrapper)
                    if replaced is not value:
                        setattr(parent, name, replaced)
    _keras_compat.replace_in_graph(layer, wrapper)


def _replace_in(value, old, new, depth=0):
    """Replaces `old` by `new` in nested lists, tuples and dicts.

    Lists and dicts change in place (they may be Keras or TensorFlow
    tracking wrappers); a tuple comes back as a new tuple.
    """
    if depth > 4:
        return value
    if isinstance(value, list):
        for i, item in enumerate(value):
            if item is old:
                value[i] = new
            else:
                replaced = _replace_in(item, old, new, depth + 1)
                if replaced is not item:
                    value[i] = replaced
        return value
    if isinstance(value, dict):
        for key, item in list(value.items()):
            if item is old:
                value[key] = new
            else:
                replaced = _replace_in(item, old, new, depth + 1)
                if replaced is not item:
                    value[key] = replaced
        return value
    # Named tuples (TensorFlow's checkpoint references among them) are left
    # alone: their fields are not a sequence of layers.
    if type(value) is tuple:
        items = [
            new if item is old else _replace_in(item, old, new, depth + 1)
            for item in value
        ]
        if any(a is not b for a, b in zip(items, value)):
            return tuple(items)
    return value


def _retrack_torch_parameters(model):
    # Every torch ancestor caches the variables of its subtree, taken when
    # it was built.
    for layer in [model] + _walk(model)[0]:
        _keras_compat.retrack_torch_variables(layer)
