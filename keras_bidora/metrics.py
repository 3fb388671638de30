"""Evaluation metrics for the GLUE tasks and NER.

They take plain labels and predictions (lists or arrays) and return Python
floats, so they run the same under every Keras backend. Each follows the
usual definition that GLUE and seqeval report:

- `accuracy`: the fraction of equal labels.
- `f1_score`: binary F1 of the positive class (MRPC) or the unweighted mean
  of per-class F1 (`average="macro"`).
- `matthews_corrcoef`: Matthews correlation (CoLA), multi-class form.
- `pearson`, `spearman`: correlations (STS-B); Spearman uses average ranks
  for ties.
- `entity_scores`: entity-level precision, recall and F1 over IOB2 tag
  sequences, an entity counting as found only when its type and both ends
  match (CoNLL-2003, as `seqeval` in its default mode).
- `corpus_bleu`, `rouge_l`: generated text against several references
  (E2E NLG), computed by `sacrebleu` and `rouge-score` (the
  `[generation]` extra; there is no NumPy fallback).

With the `[metrics]` extra installed, `sklearn.metrics` computes the first
three and `scipy.stats` the correlations; without it, NumPy versions of the
same definitions do (tests/test_metrics.py checks that both agree with the
libraries). The edge cases are decided here, the same on both paths: empty
or mismatched inputs raise `ValueError`, an undefined ratio in F1 counts as
0, and a correlation with a constant input is 0 (where SciPy returns NaN).
The labels of `accuracy`, `f1_score` and `matthews_corrcoef` are class
labels (integers or strings): scikit-learn rejects other values, such as
fractional floats, with a `ValueError` that the NumPy versions do not raise.

The entity scores are this module's own code: `seqeval`, the library that
usually computes them, is published only as a source distribution whose
build fails with current setuptools-scm (`No module named
'vcs_versioning'`), so it is no dependency. `entities` reads tags as
seqeval's default mode (not `mode="strict"`) and `conlleval` do.

Example:

>>> from keras_bidora import metrics
>>> metrics.accuracy([0, 1, 1], [0, 1, 0])
0.6666666666666666
>>> metrics.entity_scores([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]])
{'precision': 0.0, 'recall': 0.0, 'f1': 0.0}
"""

import functools
import importlib

import numpy as np


@functools.cache
def _library(name):
    """The module `name`, or None without the `[metrics]` extra.

    Imported on first use, not with this module: scikit-learn and SciPy
    take about a second each to import, which every CLI start would pay.
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _pair(y_true, y_pred):
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(
            "y_true and y_pred must have the same shape. Received: "
            f"y_true.shape={y_true.shape}, y_pred.shape={y_pred.shape}"
        )
    if y_true.size == 0:
        raise ValueError("y_true and y_pred must not be empty.")
    # Compared element by element: scikit-learn would read a 2-D array as
    # multi-label targets.
    return y_true.ravel(), y_pred.ravel()


def _is_constant(values):
    return bool(np.all(values == values[0]))


def _divide(numerator, denominator):
    # An undefined ratio (no predicted or no true positives) counts as 0,
    # as scikit-learn's and seqeval's default `zero_division`.
    return float(numerator / denominator) if denominator else 0.0


def _f1(tp, fp, fn):
    precision = _divide(tp, tp + fp)
    recall = _divide(tp, tp + fn)
    return _divide(2 * precision * recall, precision + recall)


def accuracy(y_true, y_pred):
    """Fraction of predictions equal to the labels.

    Args:
        y_true: class labels, any shape.
        y_pred: predicted class labels, same shape.

    Returns:
        A float in [0, 1].
    """
    y_true, y_pred = _pair(y_true, y_pred)
    sklearn_metrics = _library("sklearn.metrics")
    if sklearn_metrics is None:
        return float(np.mean(y_true == y_pred))
    return float(sklearn_metrics.accuracy_score(y_true, y_pred))


def f1_score(y_true, y_pred, average="binary", pos_label=1):
    """F1 score, binary or macro-averaged.

    `F1 = 2 * precision * recall / (precision + recall)` with `precision =
    TP / (TP + FP)` and `recall = TP / (TP + FN)`; an undefined ratio
    counts as 0.

    Args:
        y_true: class labels, 1-D.
        y_pred: predicted class labels, 1-D.
        average: `"binary"` for the F1 of `pos_label` only (GLUE MRPC), or
            `"macro"` for the unweighted mean of the F1 of each class that
            appears in `y_true` or `y_pred`.
        pos_label: the positive class for `average="binary"`; any other
            label counts as negative, and a `pos_label` that appears
            nowhere scores 0.

    Returns:
        A float in [0, 1].
    """
    y_true, y_pred = _pair(y_true, y_pred)
    if average == "binary":
        classes = [pos_label]
    elif average == "macro":
        classes = np.union1d(y_true, y_pred)
    else:
        raise ValueError(
            "average must be 'binary' or 'macro'. Received: "
            f"average={average!r}"
        )
    sklearn_metrics = _library("sklearn.metrics")
    if sklearn_metrics is not None:
        # The F1 of the listed classes, averaged: scikit-learn's
        # `average="binary"` would refuse more than two classes and a
        # `pos_label` absent from two present ones, which score here as
        # above. `zero_division=0` is the 0 for an undefined ratio, without
        # its warning.
        return float(
            sklearn_metrics.f1_score(
                y_true,
                y_pred,
                labels=classes,
                average="macro",
                zero_division=0,
            )
        )
    scores = []
    for label in classes:
        true_is = y_true == label
        pred_is = y_pred == label
        tp = np.sum(true_is & pred_is)
        fp = np.sum(~true_is & pred_is)
        fn = np.sum(true_is & ~pred_is)
        scores.append(_f1(tp, fp, fn))
    return float(np.mean(scores))


def matthews_corrcoef(y_true, y_pred):
    """Matthews correlation coefficient (GLUE CoLA).

    The multi-class form (Gorodkin 2004), which for two classes equals
    `(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))`. It is 0 when
    the denominator is 0, i.e. when the labels or the predictions are all
    the same class.

    Args:
        y_true: class labels, 1-D.
        y_pred: predicted class labels, 1-D.

    Returns:
        A float in [-1, 1].
    """
    y_true, y_pred = _pair(y_true, y_pred)
    # scikit-learn returns 0 too, but warns when only one class appears.
    if _is_constant(y_true) or _is_constant(y_pred):
        return 0.0
    sklearn_metrics = _library("sklearn.metrics")
    if sklearn_metrics is not None:
        return float(sklearn_metrics.matthews_corrcoef(y_true, y_pred))
    classes, encoded = np.unique(
        np.concatenate([y_true, y_pred]), return_inverse=True
    )
    encoded_true = encoded[: y_true.size]
    encoded_pred = encoded[y_true.size :]
    confusion = np.zeros((classes.size, classes.size), dtype=np.float64)
    np.add.at(confusion, (encoded_true, encoded_pred), 1)
    true_sums = confusion.sum(axis=1)
    pred_sums = confusion.sum(axis=0)
    correct = np.trace(confusion)
    samples = confusion.sum()
    covariance = correct * samples - np.dot(true_sums, pred_sums)
    true_spread = samples**2 - np.dot(true_sums, true_sums)
    pred_spread = samples**2 - np.dot(pred_sums, pred_sums)
    return _divide(covariance, np.sqrt(true_spread * pred_spread))


def _numpy_pearson(x, y):
    x = x - np.mean(x)
    y = y - np.mean(y)
    return _divide(np.dot(x, y), np.sqrt(np.dot(x, x) * np.dot(y, y)))


def pearson(x, y):
    """Pearson correlation coefficient (GLUE STS-B).

    Args:
        x: numbers, 1-D.
        y: numbers, same length.

    Returns:
        A float in [-1, 1]; 0 if either input is constant.
    """
    x, y = _pair(x, y)
    # SciPy returns NaN (and warns) for a constant input, and wants two
    # values at least (one value is constant).
    if _is_constant(x) or _is_constant(y):
        return 0.0
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    scipy_stats = _library("scipy.stats")
    if scipy_stats is None:
        return _numpy_pearson(x, y)
    return float(scipy_stats.pearsonr(x, y).statistic)


def _average_ranks(values):
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Runs of equal values share the mean of the ranks they span.
    starts = np.flatnonzero(
        np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    )
    ends = np.concatenate([starts[1:], [values.size]])
    run_ranks = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return ranks


def spearman(x, y):
    """Spearman rank correlation (GLUE STS-B).

    The Pearson correlation of the ranks, ties taking their average rank.

    Args:
        x: numbers, 1-D.
        y: numbers, same length.

    Returns:
        A float in [-1, 1]; 0 if either input is constant.
    """
    x, y = _pair(x, y)
    # As in `pearson`: SciPy's NaN for a constant input is 0 here.
    if _is_constant(x) or _is_constant(y):
        return 0.0
    scipy_stats = _library("scipy.stats")
    if scipy_stats is None:
        return _numpy_pearson(_average_ranks(x), _average_ranks(y))
    return float(scipy_stats.spearmanr(x, y).statistic)


def _split_tag(tag):
    if tag == "O" or not tag:
        return "O", ""
    prefix, _, entity_type = tag.partition("-")
    if prefix not in ("B", "I") or not entity_type:
        raise ValueError(
            "Tags must be 'O' or 'B-TYPE'/'I-TYPE' (IOB2). Received: "
            f"tag={tag!r}"
        )
    return prefix, entity_type


def entities(tags):
    """The entity spans of one IOB2 tag sequence.

    An entity starts at a `B-` tag, or at an `I-` tag whose type differs
    from the previous tag's (or that follows `O`), and runs over the
    following `I-` tags of its type: the reading of `conlleval` and
    `seqeval`'s default mode, under which IOB1 sequences (where `B-` only
    separates two adjacent entities of one type) read correctly too. The
    `E-` and `S-` tags that seqeval's default mode also accepts raise
    `ValueError` here.

    Args:
        tags: a sequence of tags such as `["B-PER", "I-PER", "O"]`.

    Returns:
        A list of `(type, start, end)` with `end` exclusive.
    """
    spans = []
    current = None  # [type, start]
    for index, tag in enumerate(tags):
        prefix, entity_type = _split_tag(tag)
        continues = (
            current is not None and prefix == "I" and entity_type == current[0]
        )
        if continues:
            continue
        if current is not None:
            spans.append((current[0], current[1], index))
            current = None
        if prefix in ("B", "I"):
            current = [entity_type, index]
    if current is not None:
        spans.append((current[0], current[1], len(tags)))
    return spans


def entity_scores(true_tags, pred_tags):
    """Entity-level precision, recall and F1 over IOB2 tag sequences.

    An entity is found when the prediction has an entity of the same type
    with the same start and end (see `entities`). Counts are summed over
    all sentences (micro average), as the CoNLL-2003 evaluation does.

    Args:
        true_tags: a list of sentences, each a list of IOB2 tags.
        pred_tags: a list of the same length, each sentence as long as
            the matching one in `true_tags`.

    Returns:
        A dict with `"precision"`, `"recall"` and `"f1"`.
    """
    if len(true_tags) != len(pred_tags):
        raise ValueError(
            "true_tags and pred_tags must hold the same number of "
            f"sentences. Received: {len(true_tags)} and {len(pred_tags)}"
        )
    found = true_count = pred_count = 0
    for index, (true, pred) in enumerate(zip(true_tags, pred_tags)):
        if len(true) != len(pred):
            raise ValueError(
                f"Sentence {index} has {len(true)} true tags but "
                f"{len(pred)} predicted tags."
            )
        true_spans = set(entities(true))
        pred_spans = set(entities(pred))
        found += len(true_spans & pred_spans)
        true_count += len(true_spans)
        pred_count += len(pred_spans)
    precision = _divide(found, pred_count)
    recall = _divide(found, true_count)
    return {
        "precision": precision,
        "recall": recall,
        "f1": _divide(2 * precision * recall, precision + recall),
    }


# Generation (E2E NLG) ----------------------------------------------------

GENERATION_INSTALL_HINT = 'pip install "keras-bidora[generation]"'


def _generation_library(name):
    module = _library(name)
    if module is None:
        raise ImportError(
            f"Scoring generated text needs {name.split('.')[0]}: "
            f"{GENERATION_INSTALL_HINT}"
        )
    return module


def check_generation_libraries():
    """Raises `ImportError` unless sacrebleu and rouge-score import."""
    _generation_library("sacrebleu")
    _generation_library("rouge_score.rouge_scorer")


def _check_references(hypotheses, references):
    if len(hypotheses) == 0 or len(hypotheses) != len(references):
        raise ValueError(
            "Expected as many reference lists as hypotheses, at least one. "
            f"Received: {len(hypotheses)} hypotheses and {len(references)} "
            "reference lists"
        )
    for index, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(
                "Each hypothesis's references are a non-empty list of "
                f"strings. Received at {index}: {refs!r}"
            )


def corpus_bleu(hypotheses, references):
    """Corpus BLEU (0-100) by `sacrebleu`, with its default settings.

    Args:
        hypotheses: a list of generated strings.
        references: per hypothesis, a non-empty list of reference strings
            (E2E has several references per meaning representation).

    Returns:
        A float.

    Example:

    >>> from keras_bidora import metrics
    >>> hypothesis = "the cat sat on the mat"
    >>> round(metrics.corpus_bleu([hypothesis], [[hypothesis, "a cat"]]), 1)
    100.0
    """
    _check_references(hypotheses, references)
    sacrebleu = _generation_library("sacrebleu")
    most = max(len(refs) for refs in references)
    streams = [
        [refs[i] if i < len(refs) else None for refs in references]
        for i in range(most)
    ]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def rouge_l(hypotheses, references):
    """Mean ROUGE-L F-measure (0-1) by `rouge-score`, best reference each.

    Args:
        hypotheses: a list of generated strings.
        references: per hypothesis, a non-empty list of reference strings.

    Returns:
        A float.

    Example:

    >>> from keras_bidora import metrics
    >>> metrics.rouge_l(["the cat sat"], [["a dog", "the cat sat"]])
    1.0
    """
    _check_references(hypotheses, references)
    rouge_scorer = _generation_library("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [
        scorer.score_multi(list(refs), hypothesis)["rougeL"].fmeasure
        for hypothesis, refs in zip(hypotheses, references)
    ]
    return float(np.mean(scores))
