"""Adapter-only weight files and merging adapters into plain models."""

import io
import json
import os
import secrets
import zipfile

import keras
import numpy as np

from keras_bidora import _keras_compat
from keras_bidora import config
from keras_bidora.injection import injected_model
from keras_bidora.injection import injection_config
from keras_bidora.layers.bidora_dense import BiDoRADense
from keras_bidora.layers.bidora_dense import adapted_layers
from keras_bidora.layers.bidora_dense import check_quantization_mode

FORMAT_NAME = "keras_bidora.adapter_weights"
FORMAT_VERSION = 1
_METADATA_KEY = "__metadata__"


def save_adapter_weights(model, path):
    """Saves only the adapter variables of an injected model.

    The file holds each adapted layer's `magnitude`, `lora_a` and `lora_b`,
    keyed by variable path (for example
    `transformer_layer_0/self_attention_layer/query/lora_a`), and metadata:
    the format version and each layer's rank, alpha and kind. It is a NumPy
    `.npz` archive, written to a temporary file next to `path` and then
    moved over it, so that an interrupted save never leaves a partial file.

    Args:
        model: a model returned by `keras_bidora.inject`, or a
            `BiDoRAModel`.
        path: the file to write (`.npz` is the customary extension).

    Example:

    >>> import os, tempfile
    >>> import keras_hub
    >>> import keras_bidora
    >>> backbone = keras_hub.models.BertBackbone(
    ...     vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, max_sequence_length=8)
    >>> _ = keras_bidora.inject(backbone, rank=4)
    >>> path = os.path.join(tempfile.mkdtemp(), "adapters.npz")
    >>> keras_bidora.save_adapter_weights(backbone, path)
    >>> keras_bidora.load_adapter_weights(backbone, path)
    """
    layers = _adapted_layers(model)
    arrays = {}
    metadata_layers = {}
    for layer in layers:
        for variable in _adapter_variables(layer):
            value = keras.ops.convert_to_numpy(variable)
            if value.dtype.itemsize < 4 and value.dtype.kind in "fV":
                # float16 and bfloat16 are stored exactly as float32
                # (NumPy has no bfloat16 to write).
                value = keras.ops.convert_to_numpy(
                    keras.ops.cast(variable, "float32")
                )
            arrays[variable.path] = value
        metadata_layers[layer.path] = _layer_metadata(layer)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "layers": metadata_layers,
    }
    arrays[_METADATA_KEY] = np.array(json.dumps(metadata))

    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    # Same directory, so that `os.replace` is an atomic rename; created with
    # the usual permissions, unlike `tempfile.mkstemp`'s private ones.
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(temporary, "xb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_adapter_weights(model, path):
    """Loads adapter variables saved by `save_adapter_weights`.

    The file must match the model exactly: the same adapted layers, the same
    variable paths and shapes, the same ranks and alphas. Everything is
    checked before any variable is assigned, so on error the model is
    unchanged.

    Args:
        model: a model returned by `keras_bidora.inject`, or a
            `BiDoRAModel`.
        path: a file written by `save_adapter_weights`.

    Raises:
        ValueError: if the file is truncated, corrupted or not an adapter
            file, or if it does not match the model (the message names the
            offending paths and shapes).
    """
    layers = _adapted_layers(model)
    path = os.fspath(path)
    arrays, metadata = _read(path)
    _check_format(path, metadata)
    problems = _layer_problems(layers, metadata.get("layers", {}))
    assignments, variable_problems = _assignments(layers, arrays)
    problems += variable_problems
    if problems:
        raise ValueError(
            f"The adapter file '{path}' does not match the model; nothing "
            "was loaded:\n  " + "\n  ".join(dict.fromkeys(problems))
        )
    for variable, value in assignments:
        variable.assign(keras.ops.cast(value, variable.dtype))


def _check_format(path, metadata):
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(
            f"'{path}' is not a keras_bidora adapter file (no "
            f"'{FORMAT_NAME}' metadata)."
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"'{path}' has adapter file format version "
            f"{metadata.get('format_version')!r}; this keras_bidora reads "
            f"version {FORMAT_VERSION}."
        )


def _layer_problems(layers, saved_layers):
    """How the file's adapted layers and settings differ from the model's."""
    problems = []
    model_layers = {layer.path: layer for layer in layers}
    for layer_path in model_layers:
        if layer_path not in saved_layers:
            problems.append(f"layer '{layer_path}' is not in the file")
    for layer_path in saved_layers:
        if layer_path not in model_layers:
            problems.append(
                f"the file's layer '{layer_path}' is not adapted in the model"
            )
    for layer_path, layer in model_layers.items():
        saved = saved_layers.get(layer_path)
        if saved is None:
            continue
        for key, value in _layer_metadata(layer).items():
            if saved.get(key) != value:
                problems.append(
                    f"layer '{layer_path}' has {key}={value!r} in the model "
                    f"but {key}={saved.get(key)!r} in the file"
                )
    return problems


def _assignments(layers, arrays):
    """`([(variable, value)], problems)`: what to assign, checked first."""
    assignments, problems = [], []
    expected_paths = set()
    for layer in layers:
        for variable in _adapter_variables(layer):
            expected_paths.add(variable.path)
            value = arrays.get(variable.path)
            if value is None:
                problems.append(
                    f"variable '{variable.path}' is not in the file"
                )
            elif tuple(value.shape) != tuple(variable.shape):
                problems.append(
                    f"variable '{variable.path}' has shape "
                    f"{tuple(variable.shape)} in the model but "
                    f"{tuple(value.shape)} in the file"
                )
            elif value.dtype.kind != "f":
                problems.append(
                    f"variable '{variable.path}' has dtype {value.dtype} in "
                    "the file, not a float"
                )
            else:
                assignments.append((variable, value))
    for key in sorted(set(arrays) - expected_paths):
        problems.append(f"the file's variable '{key}' is not in the model")
    return assignments, problems


def merge(model, quantize=None):
    """A plain copy of the model with the adapters merged into its kernels.

    Every `BiDoRADense` becomes the `Dense`/`EinsumDense` it wraps, with the
    adapted kernel `W'` (`BiDoRADense.merged_kernel()`) and the original
    bias. The copy is rebuilt from the model's pre-injection config, so it
    holds no keras_bidora objects: saved as `.keras`, it loads with plain
    `keras.saving.load_model`. The copy is not compiled; a KerasHub task
    copy shares the original's preprocessor and, for a generative task,
    its sampler. The input model is not changed.

    The copy is a float model: a kernel or embedding table quantized to
    int8 or int4 (before or after `inject`) comes back dequantized, and
    `W'` is merged from the dequantized `W0`. `quantize="int8"` (or
    `"int4"`) quantizes the whole copy again with `keras.Model.quantize`.

    Args:
        model: a model returned by `keras_bidora.inject`, or a
            `BiDoRAModel` (whose wrapped model is merged).
        quantize: `None` (a float copy), or a mode of
            `keras_bidora.config.QUANTIZATION_MODES` to quantize it to.

    Returns:
        A new `keras.Model` computing what the adapted model computes
        (within the quantization error, with `quantize`).

    Example:

    >>> import numpy as np
    >>> import keras_hub
    >>> import keras_bidora
    >>> backbone = keras_hub.models.BertBackbone(
    ...     vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, max_sequence_length=8)
    >>> _ = keras_bidora.inject(backbone, rank=4)
    >>> merged = keras_bidora.merge(backbone)
    >>> type(merged).__name__
    'BertBackbone'
    """
    if quantize is not None:
        check_quantization_mode(quantize, f"quantize={quantize!r}")
    source = injected_model(model)
    model_config = _float_config(injection_config(source)["model"])
    preprocessor = getattr(source, "preprocessor", None)
    if "preprocessor" not in model_config.get("config", {}):
        preprocessor = None
    if preprocessor is not None:
        # A config alone lacks a preprocessor's assets (vocabularies): the
        # copy shares the original's preprocessor, which has no weights.
        model_config["config"]["preprocessor"] = None
    merged = keras.saving.deserialize_keras_object(model_config)
    _assign_merged_weights(source, merged)
    if preprocessor is not None:
        merged.preprocessor = preprocessor
    if getattr(source, "sampler", None) is not None:
        # A generative task's sampler (e.g. greedy) is part of what it
        # generates; the copy's would be its class's default.
        merged.sampler = source.sampler
    if quantize is not None:
        merged.quantize(quantize)
    return merged


def _assign_merged_weights(source, merged):
    """Gives each weight of `merged` its float value from `source`.

    Weights are matched by variable path: an adapted kernel takes `W'`, a
    quantized kernel or embedding table its dequantized value, any other
    weight the source's value.
    """
    layers = adapted_layers(source)
    adapter_ids = {
        id(variable)
        for layer in layers
        for variable in _adapter_variables(layer)
    }
    variables = {w.path: w for w in source.weights if id(w) not in adapter_ids}
    wrappers = {layer.path: layer for layer in layers}
    quantized = {
        layer.path: layer
        for layer in _keras_compat.flatten_layers(source)
        if layer.quantization_mode is not None
        and not isinstance(layer, BiDoRADense)
    }
    missing = []
    for weight in merged.weights:
        layer_path, _, name = weight.path.rpartition("/")
        if name == "kernel" and layer_path in wrappers:
            value = wrappers[layer_path].merged_kernel()
        elif layer_path in quantized and name in ("kernel", "embeddings"):
            value = _dequantized(quantized[layer_path], name, weight.dtype)
        else:
            variable = variables.get(weight.path)
            value = None if variable is None else variable.value
        if value is None or tuple(value.shape) != tuple(weight.shape):
            missing.append(f"{weight.path} {tuple(weight.shape)}")
            continue
        # A copy: on JAX, a `predict` of either model donates the buffers
        # of its variables, which the two would otherwise share.
        weight.assign(keras.ops.copy(value))
    if missing:
        raise ValueError(
            "The model rebuilt from the pre-injection config has weights "
            "the injected model does not have (by path and shape); first "
            f"ones: {missing[:5]}"
        )


def _dequantized(layer, name, dtype):
    """The float value of a quantized kernel or embedding table."""
    mode = layer.quantization_mode
    if mode == "float8":
        # float8 keeps the float kernel and quantizes only in its call.
        return keras.ops.cast(getattr(layer, name), dtype)
    if mode in config.QUANTIZATION_MODES:
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
            return _keras_compat.dequantized_kernel(layer, dtype)
        if isinstance(layer, keras.layers.Embedding):
            # A quantized embedding looks up dequantized rows.
            ids = keras.ops.arange(layer.input_dim)
            return keras.ops.cast(layer(ids), dtype)
    raise ValueError(
        f"merge cannot dequantize weight {name!r} of layer {layer.path!r} "
        f"({type(layer).__name__}, quantization_mode="
        f"{layer.quantization_mode!r})."
    )


def _float_config(value):
    """A serialized model with each quantized dtype policy made float.

    A quantized policy becomes the policy it was made from, and a KerasHub
    backbone's `DTypePolicyMap` (what its config holds once quantized) its
    default policy; layer configs lose their `quantization_config`.
    """
    if isinstance(value, list):
        return [_float_config(item) for item in value]
    if not isinstance(value, dict):
        return value
    if value.get("module") == "keras.dtype_policies":
        policy_config = value.get("config") or {}
        if value.get("class_name") == "DTypePolicyMap":
            return _float_config(policy_config.get("default_policy"))
        if "source_name" in policy_config:
            return policy_config["source_name"]
        return value
    return {
        key: None if key == "quantization_config" else _float_config(item)
        for key, item in value.items()
    }


def _adapted_layers(model):
    layers = adapted_layers(injected_model(model))
    if not layers:
        raise ValueError(
            "The model has no BiDoRA adapters: call keras_bidora.inject "
            f"first. Received: model={getattr(model, 'name', model)!r}"
        )
    return layers


def _adapter_variables(layer):
    variables = [layer.lora_a, layer.lora_b]
    if layer.use_magnitude:
        variables.insert(0, layer.magnitude)
    return variables


def _layer_metadata(layer):
    return {
        "rank": layer.rank,
        "alpha": layer.alpha,
        "magnitude": layer.use_magnitude,
        "kernel_shape": list(layer.layer.kernel.shape),
    }


def _read(path):
    """Reads every array of an adapter file, or raises a clear error."""
    try:
        with open(path, "rb") as file:
            content = file.read()
        with np.load(io.BytesIO(content), allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        metadata = json.loads(str(arrays.pop(_METADATA_KEY)))
        if not isinstance(metadata, dict):
            raise ValueError("the metadata is not a JSON object")
    except FileNotFoundError:
        raise
    except (
        OSError,
        EOFError,
        KeyError,
        ValueError,
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
    ) as error:
        raise ValueError(
            f"Cannot read the adapter file '{path}': it is truncated, "
            f"corrupted or not a keras_bidora adapter file ({error})"
        ) from None
    return arrays, metadata
