import contextlib
import sys
import warnings
from unittest import mock

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sklearn_metrics

from keras_bidora import metrics

# What `import sklearn.metrics` and `import scipy.stats` find without the
# `[metrics]` extra.
WITHOUT_LIBRARIES = {
    "sklearn": None,
    "sklearn.metrics": None,
    "scipy": None,
    "scipy.stats": None,
}


@contextlib.contextmanager
def libraries(available):
    """Runs the block with scikit-learn and SciPy importable or not."""
    metrics._library.cache_clear()
    try:
        if available:
            yield
        else:
            with mock.patch.dict(sys.modules, WITHOUT_LIBRARIES):
                yield
    finally:
        metrics._library.cache_clear()


@pytest.fixture(params=[True, False], ids=["libraries", "numpy"])
def available(request):
    """Whether the test runs with the `[metrics]` extra or without it."""
    return request.param


def label_cases(count=150):
    """Seeded labels and predictions: binary and multi-class, 1 to 40."""
    rng = np.random.default_rng(0)
    for _ in range(count):
        size = rng.integers(1, 41)
        num_classes = rng.integers(2, 6)
        y_true = rng.integers(0, num_classes, size)
        # From chance level to nearly right, as a model's predictions are.
        guesses = rng.integers(0, num_classes, size)
        y_pred = np.where(rng.random(size) < rng.random(), y_true, guesses)
        yield y_true, y_pred


def score_cases(count=150):
    """Seeded STS-B-like scores, half of the cases with many ties."""
    rng = np.random.default_rng(1)
    for _ in range(count):
        size = rng.integers(2, 61)
        x = rng.normal(size=size)
        y = rng.normal() * x + rng.normal(size=size)
        if rng.random() < 0.5:
            x = np.round(x * 2) / 2
            y = np.round(y)
        yield x, y


def is_constant(values):
    return np.all(values == values[0])


def library_scores(y_true, y_pred):
    """The classification metrics as scikit-learn computes them.

    Accuracy, the binary F1 of each of the classes 0 to 5 (5 appears in no
    case), macro F1 and Matthews correlation.
    """
    with warnings.catch_warnings():
        # The single-class warning of Matthews correlation, which is 0.
        warnings.simplefilter("ignore", UserWarning)
        matthews = sklearn_metrics.matthews_corrcoef(y_true, y_pred)
    return [
        sklearn_metrics.accuracy_score(y_true, y_pred),
        # The F1 of one class against the rest, as a binary task.
        *(
            sklearn_metrics.f1_score(
                y_true == label, y_pred == label, zero_division=0
            )
            for label in range(6)
        ),
        sklearn_metrics.f1_score(
            y_true, y_pred, average="macro", zero_division=0
        ),
        matthews,
    ]


def our_scores(y_true, y_pred):
    return [
        metrics.accuracy(y_true, y_pred),
        *(
            metrics.f1_score(y_true, y_pred, pos_label=label)
            for label in range(6)
        ),
        metrics.f1_score(y_true, y_pred, average="macro"),
        metrics.matthews_corrcoef(y_true, y_pred),
    ]


def assert_scores_close(actual, expected):
    """`actual` equals `expected` up to float rounding, case by case."""
    assert all(type(score) is float for row in actual for score in row)
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12)


# Cross-checks against scikit-learn and SciPy ---------------------------


def test_classification_metrics_match_scikit_learn(available):
    cases = list(label_cases())
    expected = [library_scores(*case) for case in cases]
    with libraries(available):
        actual = [our_scores(*case) for case in cases]
    assert_scores_close(actual, expected)


def test_string_labels_match_scikit_learn(available):
    names = np.array(["contradiction", "entailment", "neutral"])
    cases = [(names[t % 3], names[p % 3]) for t, p in label_cases(50)]
    expected = [
        (
            sklearn_metrics.accuracy_score(t, p),
            sklearn_metrics.f1_score(t, p, average="macro", zero_division=0),
            sklearn_metrics.f1_score(
                t == "neutral", p == "neutral", zero_division=0
            ),
        )
        for t, p in cases
    ]
    with libraries(available):
        actual = [
            (
                metrics.accuracy(t, p),
                metrics.f1_score(t, p, average="macro"),
                metrics.f1_score(t, p, pos_label="neutral"),
            )
            for t, p in cases
        ]
    assert_scores_close(actual, expected)


def test_correlations_match_scipy(available):
    cases = list(score_cases())
    # A constant input, which rounding gives now and then, scores 0 where
    # SciPy gives NaN.
    constant = [is_constant(x) or is_constant(y) for x, y in cases]
    expected = [
        (0.0, 0.0)
        if flat
        else (stats.pearsonr(x, y).statistic, stats.spearmanr(x, y).statistic)
        for (x, y), flat in zip(cases, constant)
    ]
    with libraries(available):
        actual = [
            (metrics.pearson(x, y), metrics.spearman(x, y)) for x, y in cases
        ]
    assert_scores_close(actual, expected)
    # Ties are what tell average ranks from ordinal ones: check they occur.
    assert any(np.unique(x).size < x.size for x, _ in cases)


def test_the_libraries_compute_when_installed(available):
    y_true = [0, 1, 2, 1, 0, 2, 1]
    y_pred = [0, 2, 2, 1, 0, 1, 1]
    x = [0.5, 2.0, 3.5, 3.5, 1.0, 4.0, 2.5]
    y = [1.0, 1.5, 4.0, 3.0, 0.5, 5.0, 2.0]
    spies = {
        (module, name): mock.patch.object(
            module, name, wraps=getattr(module, name)
        )
        for module, name in [
            (sklearn_metrics, "accuracy_score"),
            (sklearn_metrics, "f1_score"),
            (sklearn_metrics, "matthews_corrcoef"),
            (stats, "pearsonr"),
            (stats, "spearmanr"),
        ]
    }
    with contextlib.ExitStack() as stack:
        called = {
            name: stack.enter_context(spy) for (_, name), spy in spies.items()
        }
        with libraries(available):
            results = [
                metrics.accuracy(y_true, y_pred),
                metrics.f1_score(y_true, y_pred, average="macro"),
                metrics.matthews_corrcoef(y_true, y_pred),
                metrics.pearson(x, y),
                metrics.spearman(x, y),
            ]
            if not available:
                assert metrics._library("sklearn.metrics") is None
                assert metrics._library("scipy.stats") is None
    for name, spy in called.items():
        assert spy.call_count == (1 if available else 0), name
    expected = [
        sklearn_metrics.accuracy_score(y_true, y_pred),
        sklearn_metrics.f1_score(y_true, y_pred, average="macro"),
        sklearn_metrics.matthews_corrcoef(y_true, y_pred),
        stats.pearsonr(x, y).statistic,
        stats.spearmanr(x, y).statistic,
    ]
    if available:
        assert results == expected
    assert_scores_close([results], [expected])


# Edge cases, the same with and without the libraries -------------------


def test_edge_cases(available):
    with libraries(available), warnings.catch_warnings():
        warnings.simplefilter("error")
        # No positive predicted and none true: F1 is 0, not NaN.
        assert metrics.f1_score([0, 0], [0, 0]) == 0.0
        # A positive class that appears nowhere scores 0, among two
        # classes or more.
        assert metrics.f1_score([0, 2], [2, 0]) == 0.0
        assert metrics.f1_score([0, 2, 3], [0, 3, 3], pos_label=1) == 0.0
        # Other labels count as negative: TP = 1, FP = 1, FN = 0.
        assert metrics.f1_score([2, 0, 1], [1, 0, 1], pos_label=1) == (
            pytest.approx(2 / 3)
        )
        # A constant prediction (the majority class) scores 0, as in GLUE,
        # and so does a single class on both sides.
        assert metrics.matthews_corrcoef([1, 0, 1], [1, 1, 1]) == 0.0
        assert metrics.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0
        assert metrics.matthews_corrcoef([1, 1], [1, 1]) == 0.0
        assert metrics.matthews_corrcoef([1], [1]) == 0.0
        assert metrics.matthews_corrcoef([1, 0, 1], [1, 0, 1]) == 1.0
        assert metrics.matthews_corrcoef([1, 0, 1], [0, 1, 0]) == -1.0
        # A constant input scores 0, not NaN, also when the float mean is
        # not the value itself; one value is constant.
        for correlation in (metrics.pearson, metrics.spearman):
            assert correlation([1, 1, 1], [1, 2, 3]) == 0.0
            assert correlation([1, 2, 3], [2, 2, 2]) == 0.0
            assert correlation([0.1] * 7, range(7)) == 0.0
            assert correlation([3.0], [4.0]) == 0.0
            assert correlation([1, 2], [2, 1]) == pytest.approx(-1.0)
        # Accuracy compares element by element, any shape.
        assert metrics.accuracy([[1, 0], [1, 1]], [[1, 1], [1, 1]]) == 0.75
        assert metrics.accuracy(np.array([2, 2]), np.array([2, 2])) == 1.0
        assert type(metrics.accuracy([1], [1])) is float


def test_errors(available):
    with libraries(available):
        for function in (
            metrics.accuracy,
            metrics.f1_score,
            metrics.matthews_corrcoef,
            metrics.pearson,
            metrics.spearman,
        ):
            with pytest.raises(ValueError, match="same shape"):
                function([1, 2], [1])
            with pytest.raises(ValueError, match="must not be empty"):
                function([], [])
        with pytest.raises(ValueError, match="average"):
            metrics.f1_score([1], [1], average="micro")


# By hand ---------------------------------------------------------------


def test_accuracy_by_hand():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_binary_f1_by_hand():
    # TP = 2, FP = 1, FN = 1: precision = recall = 2/3.
    y_true = [1, 1, 1, 0, 0]
    y_pred = [1, 1, 0, 1, 0]
    assert metrics.f1_score(y_true, y_pred) == pytest.approx(2 / 3)
    # Of class 0: TP = 1, FP = 1, FN = 1.
    assert metrics.f1_score(y_true, y_pred, pos_label=0) == pytest.approx(0.5)


def test_macro_f1_by_hand():
    y_true = ["a", "a", "b", "c"]
    y_pred = ["a", "b", "b", "b"]
    # a: P=1, R=1/2 -> 2/3; b: P=1/3, R=1 -> 1/2; c: 0.
    expected = (2 / 3 + 1 / 2 + 0) / 3
    assert metrics.f1_score(y_true, y_pred, average="macro") == (
        pytest.approx(expected)
    )


def test_matthews_by_hand():
    # TP=2, TN=1, FP=1, FN=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6.
    y_true = [1, 1, 1, 0, 0]
    y_pred = [1, 1, 0, 1, 0]
    assert metrics.matthews_corrcoef(y_true, y_pred) == pytest.approx(1 / 6)
    # Multi-class (Gorodkin): confusion [[2, 1, 0], [0, 1, 0], [0, 1, 0]],
    # true sums t = (3, 1, 1), predicted sums p = (2, 3, 0), 3 right of 5:
    # (3*5 - t.p) / sqrt((5**2 - t.t) * (5**2 - p.p))
    # = (15 - 9) / sqrt((25 - 11) * (25 - 13)).
    y_true = [0, 0, 0, 1, 2]
    y_pred = [0, 0, 1, 1, 1]
    expected = 6 / np.sqrt(14 * 12)
    assert metrics.matthews_corrcoef(y_true, y_pred) == pytest.approx(expected)


# Entities --------------------------------------------------------------


@pytest.mark.parametrize(
    "tags, spans",
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
        # A stray I- starts an entity; a type change ends one (conlleval).
        (
            ["O", "I-ORG", "I-LOC", "B-LOC", "I-LOC"],
            [("ORG", 1, 2), ("LOC", 2, 3), ("LOC", 3, 5)],
        ),
        # B- after B- of the same type: two entities.
        (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),
        # IOB1, where B- only splits adjacent entities of one type.
        (
            ["I-PER", "I-PER", "B-PER", "O", "I-LOC"],
            [("PER", 0, 2), ("PER", 2, 3), ("LOC", 4, 5)],
        ),
        (["O", "O"], []),
    ],
)
def test_entities(tags, spans):
    assert metrics.entities(tags) == spans


def test_entity_scores_by_hand():
    # seqeval's README example: one of two entities found in each sentence
    # set, so precision = recall = F1 = 0.5.
    y_true = [
        ["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"],
        ["B-PER", "I-PER", "O"],
    ]
    y_pred = [
        ["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"],
        ["B-PER", "I-PER", "O"],
    ]
    assert metrics.entity_scores(y_true, y_pred) == {
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
    }
    # Two true entities, three predicted, one right: P=1/3, R=1/2, F1=2/5.
    scores = metrics.entity_scores(
        [["B-PER", "O", "B-ORG", "I-ORG"]],
        [["B-PER", "B-LOC", "B-ORG", "O"]],
    )
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == pytest.approx(1 / 2)
    assert scores["f1"] == pytest.approx(0.4)


def test_entity_scores_partial_matches_and_types():
    true_tags = [
        ["B-PER", "I-PER", "O", "B-LOC"],  # PER 0-2, LOC 3-4
        ["O", "B-MISC", "I-MISC", "O"],  # MISC 1-3
        ["B-ORG"],  # ORG 0-1
        ["O", "O"],  # none
    ]
    pred_tags = [
        ["B-PER", "I-PER", "O", "B-ORG"],  # PER right; ORG: wrong type
        ["O", "B-MISC", "I-MISC", "I-MISC"],  # MISC 1-4: one token long
        ["I-ORG"],  # a stray I- starts ORG 0-1: right
        ["B-PER", "O"],  # a PER that is not there
    ]
    # 4 true entities, 5 predicted, 2 found: P = 2/5, R = 1/2,
    # F1 = 2 * (2/5 * 1/2) / (2/5 + 1/2) = (2/5) / (9/10) = 4/9.
    scores = metrics.entity_scores(true_tags, pred_tags)
    assert scores["precision"] == pytest.approx(2 / 5)
    assert scores["recall"] == pytest.approx(1 / 2)
    assert scores["f1"] == pytest.approx(4 / 9)
    # Only partial matches or type mismatches: nothing found.
    assert metrics.entity_scores(
        [["B-PER", "I-PER", "I-PER"], ["B-ORG", "I-ORG"]],
        [["B-PER", "I-PER", "O"], ["B-LOC", "I-LOC"]],
    ) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # No entity anywhere: undefined ratios are 0.
    assert metrics.entity_scores([["O"]], [["O"]]) == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
    }


def test_entity_errors():
    with pytest.raises(ValueError, match="IOB2"):
        metrics.entities(["X-PER"])
    # IOBES tags, which seqeval's default mode also reads, are refused.
    with pytest.raises(ValueError, match="IOB2"):
        metrics.entities(["S-PER"])
    with pytest.raises(ValueError, match="Sentence 0"):
        metrics.entity_scores([["O"]], [["O", "O"]])
    with pytest.raises(ValueError, match="same number of sentences"):
        metrics.entity_scores([["O"]], [])


# Generation -------------------------------------------------------------


def _lcs(a, b):
    table = np.zeros((len(a) + 1, len(b) + 1), int)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1, j + 1] = (
                table[i, j] + 1
                if x == y
                else max(table[i, j + 1], table[i + 1, j])
            )
    return table[-1, -1]


def _rouge_l_by_hand(hypothesis, reference):
    h, r = hypothesis.lower().split(), reference.lower().split()
    lcs = _lcs(h, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(h), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def test_generation_scores_by_hand():
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    hypotheses = ["the cat sat on the mat today", "a dog ran in the park"]
    references = [
        ["the cat sat on the mat"],
        ["a dog ran in a park", "the dog ran in the big park"],
    ]
    # BLEU: clipped n-gram precisions over the corpus, the closest
    # reference length, no brevity penalty (hypotheses are as long).
    # Pair 2 matches an n-gram from either reference ("in the" the
    # second's, "a dog" the first's; "the park" neither's).
    matches = np.array([6 + 6, 5 + 4, 4 + 3, 3 + 2])
    totals = np.array([7 + 6, 6 + 5, 5 + 4, 4 + 3])
    expected = 100 * np.exp(np.mean(np.log(matches / totals)))
    assert metrics.corpus_bleu(hypotheses, references) == pytest.approx(
        expected, rel=1e-6
    )
    # ROUGE-L: the best reference's LCS F-measure, averaged.
    expected = np.mean(
        [
            max(_rouge_l_by_hand(h, r) for r in refs)
            for h, refs in zip(hypotheses, references)
        ]
    )
    assert metrics.rouge_l(hypotheses, references) == pytest.approx(expected)


def test_generation_score_errors():
    with pytest.raises(ValueError, match="1 hypotheses and 2 reference"):
        metrics.corpus_bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="Received at 0: 'a b'"):
        metrics.rouge_l(["a"], ["a b"])
    with pytest.raises(ValueError, match="Received at 1: \\[\\]"):
        metrics.rouge_l(["a", "b"], [["a"], []])
