"""Reads the shipped GLUE, CoNLL-2003 and E2E NLG files and users' files.

Nothing here imports Keras: loading and checking data is fast, so a bad
file is reported before any model is built.
"""

import csv
import dataclasses
import json
import os

import numpy as np

from keras_bidora.checks import check_count
from keras_bidora.data.task_spec import TaskSpec
from keras_bidora.data.task_spec import get_task_spec

FILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "files")

SPLITS = ("train", "dev")

# Per GLUE task: folder, header lines, text columns, label column and the
# raw label of each class id (None for regression). Columns are header
# names, or indices for CoLA, whose file has no header.
_GLUE = {
    "sst2": ("SST-2", 1, ("sentence",), "label", ("0", "1")),
    "rte": (
        "RTE",
        1,
        ("sentence1", "sentence2"),
        "label",
        ("entailment", "not_entailment"),
    ),
    "mrpc": ("MRPC", 1, ("#1 String", "#2 String"), "Quality", ("0", "1")),
    "cola": ("CoLA", 0, (3,), 1, ("0", "1")),
    "stsb": ("STS-B", 1, ("sentence1", "sentence2"), "score", None),
}
_CONLL_FILES = {"train": "eng.train", "dev": "eng.testa"}
_E2E_FILES = {"train": "trainset.csv", "dev": "devset.csv"}
# How an E2E meaning representation becomes a causal LM's prompt.
E2E_PROMPT = "{mr} => "


@dataclasses.dataclass
class TaskData:
    """Examples of one split of a task.

    Attributes:
        texts: a list of strings, or for pairs a tuple of two lists
            `(first_texts, second_texts)`, or for token classification a
            list of sentences, each a list of words.
        labels: an int32 array of class ids, a float32 array of targets
            (regression), or for token classification a list of int32
            arrays of tag ids (IOB2).
        spec: the task's `TaskSpec`.
        path: the file the examples were read from.
    """

    texts: object
    labels: object
    spec: TaskSpec
    path: str

    def __len__(self):
        return len(self.labels)


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(
            f"split must be one of {SPLITS}. Received: split={split!r}"
        )


def _check_file(path):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")


def load_task(name, split, limit=None, data_dir=None):
    """Loads a split of a built-in task.

    GLUE tasks (`sst2`, `rte`, `mrpc`, `cola`, `stsb`) give texts or text
    pairs with class ids or scores; `conll2003` gives sentences as word
    lists with IOB2 tag ids (the files' IOB1 tags are converted). The
    shipped files are small subsets (see `files/README.md`); `data_dir`
    reads full copies laid out the same way (`glue/SST-2/train.tsv`, ...,
    `conll2003/eng.train`, `conll2003/eng.testa`).

    Args:
        name: the task's name (see `keras_bidora.data.TASKS`).
        split: `"train"` or `"dev"`.
        limit: keep only the first `limit` examples.
        data_dir: a folder to read instead of the shipped files.

    Returns:
        A `TaskData`.

    Example:

    >>> from keras_bidora.data import load_task
    >>> data = load_task("rte", "dev", limit=3)
    >>> len(data), data.spec.pair, data.labels.tolist()
    (3, True, [1, 0, 1])
    """
    spec = get_task_spec(name)
    _check_split(split)
    limit = check_count("limit", limit, 1, allow_none=True)
    root = FILES_DIR if data_dir is None else data_dir
    if spec.kind == "token_classification":
        path = os.path.join(root, "conll2003", _CONLL_FILES[split])
        words, tags = read_conll(path)
        words, tags = words[:limit], tags[:limit]
        index = {tag: i for i, tag in enumerate(spec.label_names)}
        labels = []
        for sentence, sentence_tags in zip(words, tags):
            for tag in sentence_tags:
                if tag not in index:
                    raise ValueError(
                        f"{path}: tag {tag!r} is not one of "
                        f"{', '.join(spec.label_names)}"
                    )
            labels.append(
                np.array([index[t] for t in sentence_tags], dtype="int32")
            )
        return TaskData(words, labels, spec, path)

    _, header, text_columns, label_column, raw_labels = _GLUE[spec.name]
    path = glue_path(spec.name, split, data_dir)
    rows = _read_glue_tsv(path, header)[:limit]
    texts = [[row[column] for row in rows] for column in text_columns]
    raw = [row[label_column] for row in rows]
    labels = _encode_labels(raw, raw_labels, path)
    texts = tuple(texts) if spec.pair else texts[0]
    return TaskData(texts, labels, spec, path)


def load_e2e(split, limit=None, data_dir=None):
    """Loads a split of E2E NLG as prompt/response strings.

    Each row's meaning representation becomes the prompt (`E2E_PROMPT`,
    e.g. `"name[Alimentum], area[city centre] => "`) and its reference
    text the response, the form `BiDoRAModel.fit` takes for a `CausalLM`
    (the prompt's tokens are then masked out of the loss). The shipped
    files are small subsets (see `files/README.md`); `data_dir` reads full
    copies laid out the same way (`e2e_nlg/trainset.csv`,
    `e2e_nlg/devset.csv`).

    Args:
        split: `"train"` or `"dev"`.
        limit: keep only the first `limit` rows.
        data_dir: a folder to read instead of the shipped files.

    Returns:
        A dict `{"prompts": [...], "responses": [...]}` of strings.

    Example:

    >>> from keras_bidora.data import load_e2e
    >>> data = load_e2e("dev", limit=2)
    >>> len(data["prompts"]), data["prompts"][0].endswith(" => ")
    (2, True)
    """
    _check_split(split)
    limit = check_count("limit", limit, 1, allow_none=True)
    root = FILES_DIR if data_dir is None else data_dir
    path = os.path.join(root, "e2e_nlg", _E2E_FILES[split])
    _check_file(path)
    with open(path, encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))[:limit]
    if rows and not {"mr", "ref"} <= set(rows[0]):
        raise ValueError(
            f"{path}: expected the columns 'mr' and 'ref'. Received: "
            f"{sorted(rows[0])}"
        )
    return {
        "prompts": [E2E_PROMPT.format(mr=row["mr"]) for row in rows],
        "responses": [row["ref"] for row in rows],
    }


def glue_path(name, split, data_dir=None):
    """The path of a GLUE task's split: `DIR/glue/<FOLDER>/<split>.tsv`.

    Args:
        name: a GLUE task's name, e.g. `"rte"`.
        split: `"train"` or `"dev"`.
        data_dir: the data folder; defaults to the shipped files.
    """
    if name not in _GLUE:
        raise ValueError(
            f"{name!r} is not a GLUE task; expected one of "
            f"{', '.join(_GLUE)}. Received: name={name!r}"
        )
    _check_split(split)
    root = FILES_DIR if data_dir is None else data_dir
    return os.path.join(root, "glue", _GLUE[name][0], f"{split}.tsv")


def _read_glue_tsv(path, header):
    """Rows of a GLUE TSV, as dicts by header name (or by column index)."""
    _check_file(path)
    # GLUE files are not quoted: a leading '"' is text, so split on tabs.
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().splitlines()
    names = lines[0].split("\t") if header else None
    rows = []
    for number, line in enumerate(lines[header:], start=header + 1):
        if not line:
            continue
        fields = line.split("\t")
        if names is None:
            rows.append(dict(enumerate(fields)))
            continue
        if len(fields) != len(names):
            raise ValueError(
                f"{path}, line {number}: {len(fields)} fields, expected "
                f"{len(names)}"
            )
        rows.append(dict(zip(names, fields)))
    if not rows:
        raise ValueError(f"{path} has no data rows")
    return rows


def _encode_labels(raw, raw_labels, path):
    if raw_labels is None:
        try:
            return np.array([float(value) for value in raw], dtype="float32")
        except ValueError as error:
            raise ValueError(f"{path}: a score is not a number ({error})")
    index = {value: i for i, value in enumerate(raw_labels)}
    for value in raw:
        if value not in index:
            raise ValueError(
                f"{path}: label {value!r} is not one of {', '.join(raw_labels)}"
            )
    return np.array([index[value] for value in raw], dtype="int32")


def iob1_to_iob2(tags):
    """Converts one sentence's tags from IOB1 to IOB2.

    In IOB1 an entity starts with `I-` unless it directly follows an entity
    of the same type; IOB2 starts every entity with `B-`.

    Args:
        tags: a list of tags such as `["I-ORG", "O", "I-PER", "B-PER"]`.

    Returns:
        The IOB2 tags, e.g. `["B-ORG", "O", "B-PER", "B-PER"]`.
    """
    converted = []
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            tag = "B-" + tag[2:]
        converted.append(tag)
        previous = tag
    return converted


def read_conll(path):
    """Reads a CoNLL-2003 file: sentences of words and IOB2 tags.

    Each line holds a word, then other columns, then its NER tag (the last
    column); blank lines separate sentences and `-DOCSTART-` lines
    documents. Tags are converted from IOB1 to IOB2.

    Args:
        path: the file.

    Returns:
        `(words, tags)`: two lists of sentences, each a list of strings.
    """
    _check_file(path)
    words, tags = [], []
    sentence_words, sentence_tags = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if sentence_words:
                    words.append(sentence_words)
                    tags.append(iob1_to_iob2(sentence_tags))
                sentence_words, sentence_tags = [], []
                continue
            if len(fields) < 2:
                raise ValueError(
                    f"{path}, line {number}: expected a word and a tag, "
                    f"got {line.strip()!r}"
                )
            sentence_words.append(fields[0])
            sentence_tags.append(fields[-1])
    if sentence_words:
        words.append(sentence_words)
        tags.append(iob1_to_iob2(sentence_tags))
    if not words:
        raise ValueError(f"{path} has no sentences")
    return words, tags


def read_table(path):
    """Reads a CSV, TSV or JSON Lines file into a list of dicts.

    The format comes from the extension: `.csv` (comma-separated, standard
    quoting), `.tsv`/`.tab` (tab-separated, no quoting, like the GLUE
    files) or `.jsonl`/`.json` (one JSON object per line). CSV and TSV
    files need a header line.

    Args:
        path: the file.

    Returns:
        `(rows, columns)`: the rows as dicts, and the column names.
    """
    _check_file(path)
    extension = os.path.splitext(path)[1].lower()
    if extension in (".jsonl", ".json", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{path}, line {number}: not JSON ({error.msg})"
                    )
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{path}, line {number}: expected a JSON object"
                    )
                rows.append(row)
        columns = list(dict.fromkeys(key for row in rows for key in row))
    elif extension in (".csv", ".tsv", ".tab", ".txt"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            if extension == ".csv":
                reader = csv.DictReader(f)
            else:
                reader = csv.DictReader(
                    f, delimiter="\t", quoting=csv.QUOTE_NONE
                )
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    else:
        raise ValueError(
            f"{path}: unknown file type {extension!r}; use .csv, .tsv or .jsonl"
        )
    if not rows:
        raise ValueError(f"{path} is empty: no data rows")
    return rows, columns


def _column(rows, columns, name, path, what):
    if name not in columns:
        raise ValueError(
            f"{path} has no {what} column {name!r} (columns: "
            f"{', '.join(map(str, columns))})"
        )
    values = []
    for number, row in enumerate(rows, start=1):
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(
                f"{path}, row {number}: empty {what} column {name!r}"
            )
        values.append(value)
    return values


def _sort_labels(labels):
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def _read_columns(path, text_column, text_pair_column, label_column):
    """`(path, texts, labels)` of one file: `texts` one list per column."""
    rows, columns = read_table(path)
    texts = [_column(rows, columns, text_column, path, "text")]
    if text_pair_column:
        texts.append(
            _column(rows, columns, text_pair_column, path, "text pair")
        )
    texts = [[str(text) for text in column] for column in texts]
    labels = _column(rows, columns, label_column, path, "label")
    return path, texts, labels


def _user_spec(kind, tables, label_column, text_pair_column, label_names):
    """The `TaskSpec` of a user's files: regression, or the train classes."""
    if kind == "regression":
        spec = TaskSpec(
            name="regression",
            kind="regression",
            metrics=("pearson", "spearmanr"),
            pair=bool(text_pair_column),
            description="user regression data (Pearson, Spearman)",
        )
    else:
        if label_names is None:
            if "train" not in tables:
                raise ValueError(
                    "label_names are needed to load dev data without train "
                    "data."
                )
            label_names = _sort_labels({str(v) for v in tables["train"][2]})
        label_names = tuple(str(name) for name in label_names)
        if len(label_names) < 2:
            raise ValueError(
                f"{tables['train'][0]}: column {label_column!r} holds one "
                f"class only ({label_names[0]!r}); classification needs two "
                "or more"
            )
        spec = TaskSpec(
            name="classification",
            kind="classification",
            label_names=label_names,
            metrics=("accuracy", "f1"),
            pair=bool(text_pair_column),
            f1_average="macro",
            description="user classification data (accuracy, macro F1)",
        )
    return spec


def load_files(
    train,
    dev,
    text_column,
    label_column,
    text_pair_column=None,
    kind="classification",
    label_names=None,
):
    """Loads a user's train and dev files as a task.

    For classification the classes are the distinct labels of the train
    file (sorted, numerically when they are all numbers), unless
    `label_names` gives them; a dev label outside them is an error. The
    task is scored with accuracy and macro F1 (classification) or Pearson
    and Spearman correlation (regression).

    Args:
        train: a CSV, TSV or JSONL file (see `read_table`); `None` to load
            only `dev` (then `label_names` is needed for classification).
        dev: a file in one of those formats.
        text_column: the column holding the text.
        label_column: the column holding the label.
        text_pair_column: the column holding the second text of a pair.
        kind: `"classification"` or `"regression"`.
        label_names: the classes, e.g. those of a trained model's head.

    Returns:
        `(train_data, dev_data)`, two `TaskData` (the first `None` when
        `train` is `None`).
    """
    if kind not in ("classification", "regression"):
        raise ValueError(
            "kind must be 'classification' or 'regression'. Received: "
            f"kind={kind!r}"
        )
    tables = {
        split: _read_columns(path, text_column, text_pair_column, label_column)
        for split, path in (("train", train), ("dev", dev))
        if path is not None
    }

    spec = _user_spec(kind, tables, label_column, text_pair_column, label_names)
    loaded = {}
    for split, (path, texts, raw) in tables.items():
        if kind == "regression":
            labels = []
            for number, value in enumerate(raw, start=1):
                try:
                    labels.append(float(value))
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{path}, row {number}: label {value!r} in column "
                        f"{label_column!r} is not a number"
                    )
            labels = np.array(labels, dtype="float32")
        else:
            index = {name: i for i, name in enumerate(spec.label_names)}
            labels = []
            for number, value in enumerate(raw, start=1):
                if str(value) not in index:
                    raise ValueError(
                        f"{path}, row {number}: label {value!r} is not one "
                        f"of the model's classes "
                        f"({', '.join(spec.label_names)})"
                    )
                labels.append(index[str(value)])
            labels = np.array(labels, dtype="int32")
        texts = tuple(texts) if spec.pair else texts[0]
        loaded[split] = TaskData(texts, labels, spec, path)
    return loaded.get("train"), loaded["dev"]


def subset(data, indices):
    """The examples of `data` at `indices` (an int array), as `TaskData`."""
    indices = np.asarray(indices)

    def take(values):
        if isinstance(values, np.ndarray):
            return values[indices]
        return [values[i] for i in indices]

    texts = data.texts
    texts = (
        tuple(take(t) for t in texts)
        if isinstance(texts, tuple)
        else (take(texts))
    )
    return TaskData(texts, take(data.labels), data.spec, data.path)
