"""Per-step losses of four fixed-seed runs, as JSON: a refactor's reference.

A tiny random BERT classifier on random tokens, trained with
`BiDoRAModel` four ways: the bi-level phase with `first_order` and with
`darts`, a retrain after the `first_order` phase, and joint DoRA. Every
weight and batch is seeded, so a change that keeps the training algorithm
prints the same numbers before and after, on each backend:

    KERAS_BACKEND=jax python benchmarks/golden_losses.py > before.json
    ... change the code ...
    KERAS_BACKEND=jax python benchmarks/golden_losses.py > after.json
    python benchmarks/golden_losses.py --compare before.json after.json
"""

import argparse
import json
import sys

import numpy as np


def _batch_losses():
    import keras

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.losses = []

        def on_train_batch_end(self, batch, logs=None):
            self.losses.append(
                {k: float(np.asarray(v)) for k, v in sorted(logs.items())}
            )

    return Record()


def _model(**kwargs):
    import keras
    import keras_hub

    import keras_bidora

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=12,
    )
    task = keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None
    )
    model = keras_bidora.BiDoRAModel(task, rank=4, alpha=8, seed=0, **kwargs)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-2),
        upper_optimizer=keras.optimizers.AdamW(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _data():
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, 50, (40, 12)).astype("int32"),
        "segment_ids": np.zeros((40, 12), "int32"),
        "padding_mask": np.ones((40, 12), "bool"),
    }
    return x, rng.integers(0, 2, (40,))


def runs():
    """The four runs' per-step logs: `{run: [{metric: value}, ...]}`."""
    x, y = _data()
    results = {}
    for name, kwargs in (
        ("bilevel_first_order", {"hypergradient": "first_order"}),
        ("bilevel_darts", {"hypergradient": "darts"}),
        ("dora", {"method": "dora"}),
    ):
        model = _model(**kwargs)
        record = _batch_losses()
        model.fit(x, y, batch_size=8, epochs=2, callbacks=[record], verbose=0)
        results[name] = record.losses
        if name == "bilevel_first_order":
            record = _batch_losses()
            model.retrain(
                x, y, batch_size=8, epochs=1, callbacks=[record], verbose=0
            )
            results["retrain"] = record.losses
    return results


def compare(before, after, tolerance):
    """Returns the largest absolute difference; prints each run's."""
    worst = 0.0
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None or b is None or len(a) != len(b):
            print(f"{name}: the runs differ in their steps")
            return float("inf")
        gap = max(
            abs(x[k] - y[k]) for x, y in zip(a, b) for k in set(x) | set(y)
        )
        print(f"{name}: {len(a)} steps, largest difference {gap:.3g}")
        worst = max(worst, gap)
    print("equal" if worst <= tolerance else "DIFFERENT")
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--compare", nargs=2, metavar="FILE", help="compare two outputs"
    )
    parser.add_argument("--tolerance", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.compare:
        with open(args.compare[0]) as f, open(args.compare[1]) as g:
            gap = compare(json.load(f), json.load(g), args.tolerance)
        return 0 if gap <= args.tolerance else 1
    print(json.dumps(runs()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
