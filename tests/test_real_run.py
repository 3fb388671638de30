"""BiDoRA on the real pretrained MiniLM-L6 BERT and real SST-2 sentences.

For each hypergradient: the bi-level phase on 96 SST-2 training sentences
lowers the training loss of the classifier (an independent evaluation with
`evaluate` before and after) and moves the magnitudes.

The default, `first_order`, runs on every backend. `darts` and `neumann`
run on the real model under torch only: their arithmetic is checked on
every backend against autodiff (tests/test_hypergradients.py), what this
adds is a run at a real model's scale, and the three runs took 355 s
under TensorFlow and 213 s under JAX in CI (compiling the bi-level
programs for MiniLM), against 52 s under torch.
"""

import keras
import numpy as np
import pytest

import keras_bidora
from keras_bidora import data
from tests.test_case import TestCase
from tests.test_case import to_numpy


@pytest.mark.large
class RealRunTest(TestCase):
    @classmethod
    def setUpClass(cls):
        train = data.load_task("sst2", "train", limit=96)
        encoder = data.Encoder(train.spec, data.default_preset(), 24)
        cls.spec = train.spec
        cls.x, cls.y = encoder.encode(train.texts, train.labels)

    def test_each_hypergradient_lowers_the_loss(self):
        hypergradients = ["first_order"]
        if keras.config.backend() == "torch":
            hypergradients += ["darts", "neumann"]
        for hypergradient in hypergradients:
            keras.utils.set_random_seed(0)
            classifier, _ = data.build_model(self.spec, data.default_preset())
            model = keras_bidora.BiDoRAModel(
                classifier,
                rank=8,
                alpha=16,
                hypergradient=hypergradient,
                neumann_terms=1,
                seed=0,
            )
            model.compile(
                optimizer=keras.optimizers.AdamW(2e-3, weight_decay=0.0),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True
                ),
            )
            before = model.evaluate(self.x, self.y, batch_size=32, verbose=0)
            magnitudes = [to_numpy(m) for m in model.magnitudes]
            history = model.fit(
                self.x, self.y, batch_size=16, epochs=2, verbose=0
            )
            after = model.evaluate(self.x, self.y, batch_size=32, verbose=0)
            self.assertLess(after, before, msg=hypergradient)
            self.assertTrue(
                all(np.isfinite(history.history["upper_loss"])),
                msg=hypergradient,
            )
            moved = [
                np.abs(to_numpy(m) - m0).max()
                for m, m0 in zip(model.magnitudes, magnitudes)
            ]
            self.assertGreater(min(moved), 0, msg=hypergradient)
