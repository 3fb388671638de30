"""TaskSpec: what a task predicts and how it is scored."""

import dataclasses

import numpy as np

from keras_bidora import metrics

KINDS = ("classification", "regression", "token_classification")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a task predicts and how it is scored.

    Args:
        name: the task's name, e.g. `"sst2"`.
        kind: `"classification"` (one class per text or text pair),
            `"regression"` (one number per text or pair) or
            `"token_classification"` (one tag per word, NER).
        label_names: the class names, in class-id order (the tags for
            token classification); empty for regression.
        metrics: the names of the metrics `score` reports, the main one
            first. Known names: `"accuracy"`, `"f1"`,
            `"matthews_correlation"`, `"pearson"`, `"spearmanr"`, and for
            token classification `"f1"`, `"precision"`, `"recall"`
            (entity level) and `"accuracy"` (word level).
        pair: whether each example is a pair of texts.
        f1_average: `"binary"` (F1 of class 1, as GLUE MRPC) or `"macro"`.
        description: one line for `--help` and reports.

    Example:

    >>> from keras_bidora.data import get_task_spec
    >>> spec = get_task_spec("mrpc")
    >>> spec.num_classes, spec.metrics
    (2, ('accuracy', 'f1'))
    >>> spec.score([0, 1, 1, 1], [0, 1, 0, 1])
    {'accuracy': 0.75, 'f1': 0.8}
    """

    name: str
    kind: str
    label_names: tuple = ()
    metrics: tuple = ("accuracy",)
    pair: bool = False
    f1_average: str = "binary"
    description: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(
                f"kind must be one of {KINDS}. Received: kind={self.kind!r}"
            )
        if self.kind != "regression" and len(self.label_names) < 2:
            raise ValueError(
                f"A {self.kind} task needs at least two label names. "
                f"Received: label_names={self.label_names!r}"
            )

    @property
    def num_classes(self):
        """Output units of the head: 1 for regression, else the classes."""
        return 1 if self.kind == "regression" else len(self.label_names)

    @property
    def main_metric(self):
        return self.metrics[0]

    def score(self, labels, predictions):
        """Computes this task's metrics.

        Args:
            labels: class ids (classification), numbers (regression), or
                for token classification a list of per-sentence tag-id
                sequences.
            predictions: the same structure as `labels`.

        Returns:
            A dict from metric name to float, in `metrics` order.
        """
        if self.kind == "token_classification":
            true_tags = [[self.label_names[i] for i in s] for s in labels]
            pred_tags = [[self.label_names[i] for i in s] for s in predictions]
            scores = metrics.entity_scores(true_tags, pred_tags)
            scores["accuracy"] = metrics.accuracy(
                np.concatenate([np.asarray(s) for s in labels]),
                np.concatenate([np.asarray(s) for s in predictions]),
            )
        else:
            functions = {
                "accuracy": metrics.accuracy,
                "f1": lambda y, p: metrics.f1_score(
                    y, p, average=self.f1_average
                ),
                "matthews_correlation": metrics.matthews_corrcoef,
                "pearson": metrics.pearson,
                "spearmanr": metrics.spearman,
            }
            scores = {
                name: functions[name](labels, predictions)
                for name in self.metrics
            }
        return {name: scores[name] for name in self.metrics}

    def to_config(self):
        """A JSON-friendly dict; `TaskSpec(**config)` rebuilds the spec."""
        config = dataclasses.asdict(self)
        config["label_names"] = list(self.label_names)
        config["metrics"] = list(self.metrics)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["label_names"] = tuple(config.get("label_names", ()))
        config["metrics"] = tuple(config.get("metrics", ("accuracy",)))
        return cls(**config)


NER_TAGS = (
    "O",
    "B-PER",
    "I-PER",
    "B-ORG",
    "I-ORG",
    "B-LOC",
    "I-LOC",
    "B-MISC",
    "I-MISC",
)

TASKS = {
    "sst2": TaskSpec(
        name="sst2",
        kind="classification",
        label_names=("negative", "positive"),
        metrics=("accuracy",),
        description="GLUE SST-2, sentence sentiment (accuracy)",
    ),
    "rte": TaskSpec(
        name="rte",
        kind="classification",
        label_names=("entailment", "not_entailment"),
        metrics=("accuracy",),
        pair=True,
        description="GLUE RTE, textual entailment of a pair (accuracy)",
    ),
    "mrpc": TaskSpec(
        name="mrpc",
        kind="classification",
        label_names=("not_equivalent", "equivalent"),
        metrics=("accuracy", "f1"),
        pair=True,
        description="GLUE MRPC, paraphrase pairs (accuracy, binary F1)",
    ),
    "cola": TaskSpec(
        name="cola",
        kind="classification",
        label_names=("unacceptable", "acceptable"),
        metrics=("matthews_correlation", "accuracy"),
        description="GLUE CoLA, grammatical acceptability (Matthews corr.)",
    ),
    "stsb": TaskSpec(
        name="stsb",
        kind="regression",
        metrics=("pearson", "spearmanr"),
        pair=True,
        description="GLUE STS-B, similarity score 0-5 (Pearson, Spearman)",
    ),
    "conll2003": TaskSpec(
        name="conll2003",
        kind="token_classification",
        label_names=NER_TAGS,
        metrics=("f1", "precision", "recall", "accuracy"),
        description="CoNLL-2003 English NER, IOB2 tags (entity-level F1)",
    ),
}

# Other spellings people use for the same tasks.
ALIASES = {
    "sst-2": "sst2",
    "sst": "sst2",
    "sts-b": "stsb",
    "sts": "stsb",
    "conll": "conll2003",
    "conll-2003": "conll2003",
    "ner": "conll2003",
}


def get_task_spec(name):
    """The `TaskSpec` of a built-in task, by name (case-insensitive).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    key = str(name).lower()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(
            f"Unknown task {name!r}. Known tasks: {', '.join(TASKS)}"
        )
    return TASKS[key]
