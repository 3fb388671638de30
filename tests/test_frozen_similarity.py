"""Tests of `benchmarks/frozen_similarity.py`.

The pooling and cosine are checked against one forward pass per sentence
on its unpadded tokens (NumPy means and norms), on a tiny random BERT; the
script itself runs on the real MiniLM and a few STS-B dev pairs.
"""

import json
import os

import numpy as np
import pytest

from tests.test_case import TestCase
from tests.test_case import load_benchmark
from tests.test_injection import backbone_inputs
from tests.test_injection import make_backbone

frozen_similarity = load_benchmark("frozen_similarity")


class MeanPooledCosineTest(TestCase):
    def test_matches_one_sentence_at_a_time(self):
        backbone = make_backbone("bert")
        first = backbone_inputs(backbone, batch_size=3, seed=1)
        second = backbone_inputs(backbone, batch_size=3, seed=2)
        second["padding_mask"][2, -4:] = 0
        cosines = frozen_similarity.mean_pooled_cosine(
            backbone, first, second, batch_size=2
        )
        expected = []
        for i in range(3):
            embeddings = []
            for x in (first, second):
                length = int(x["padding_mask"][i].sum())
                one = {k: v[i : i + 1, :length] for k, v in x.items()}
                sequence = backbone.predict(one, verbose=0)["sequence_output"]
                embeddings.append(np.asarray(sequence, "float64")[0].mean(0))
            a, b = embeddings
            expected.append(a @ b / np.sqrt((a @ a) * (b @ b)))
        self.assertAllClose(cosines, np.array(expected), atol=1e-5)
        same = frozen_similarity.mean_pooled_cosine(backbone, first, first)
        self.assertAllClose(same, np.ones(3), atol=1e-6)


@pytest.mark.large
class FrozenSimilarityRunTest(TestCase):
    def test_frozen_minilm_scores_stsb_pairs(self):
        data_dir = self.get_temp_dir()
        source = os.path.join(
            os.path.dirname(frozen_similarity.loaders.__file__),
            "files",
            "glue",
            "STS-B",
            "dev.tsv",
        )
        folder = os.path.join(data_dir, "glue", "STS-B")
        os.makedirs(folder)
        with open(source) as file:
            lines = file.readlines()[:41]  # the header and 40 pairs
        with open(os.path.join(folder, "dev.tsv"), "w") as file:
            file.writelines(lines)
        out = os.path.join(data_dir, "results", "frozen.json")
        code = frozen_similarity.main(
            ["--data-dir", data_dir, "--out", out, "--sequence-length", "32"]
        )
        self.assertEqual(code, 0)
        self.assertFalse(os.path.exists(f"{out}.partial"))
        with open(out) as file:
            result = json.load(file)
        self.assertEqual(result["dev_examples"], 40)
        self.assertEqual(result["sequence_length"], 32)
        # A sentence embedding model knows similarity before any training;
        # a broken pairing or pooling would score near 0.
        self.assertGreater(result["scores"]["pearson"], 0.5)
        self.assertGreater(result["scores"]["spearmanr"], 0.5)
