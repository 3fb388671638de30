"""Files saved by earlier versions load and compute what they did then.

`tests/data/bidora_model_0_1_0.keras` is a `BiDoRAModel` (a tiny random
BERT classifier, adapters at the then-default `alpha`, which meant
`alpha = rank`) trained one epoch and saved by keras-bidora 0.1.0 (commit
8d674bc, JAX backend) with `tests/data/make_legacy_files.py`; the `.npz`
beside it holds its inputs and the outputs it predicted then.
"""

import os

import keras
import numpy as np

from keras_bidora import BiDoRAModel
from tests.test_case import TestCase

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


class LegacyFilesTest(TestCase):
    def test_0_1_0_bidora_model_loads_predicts_and_resumes(self):
        import keras_hub  # noqa: F401  (registers the BERT classes)

        model = keras.saving.load_model(
            os.path.join(DATA, "bidora_model_0_1_0.keras")
        )
        with np.load(os.path.join(DATA, "bidora_model_0_1_0.npz")) as saved:
            saved = dict(saved)
        x = {
            key: saved[key]
            for key in ("token_ids", "segment_ids", "padding_mask")
        }
        self.assertIsInstance(model, BiDoRAModel)
        # The file was compiled on JAX, and Keras keeps the `jit_compile`
        # that "auto" resolved to there (True): on torch that is
        # `torch.compile`, which costs this tiny model over a minute of
        # compiling on a CPU. What is checked here is the file, not the
        # compiler.
        self.assertTrue(model.jit_compile)
        model.jit_compile = False
        # alpha=None then meant alpha = rank: a scale of 1, not today's 2.
        for layer in model.adapted_layers:
            self.assertEqual(layer.alpha, layer.rank)
            self.assertEqual(layer.scale, 1.0)
        outputs = model.predict(x, verbose=0)
        self.assertAllClose(outputs, saved["outputs"], atol=1e-5)
        # Both optimizers' states came back: training resumes.
        self.assertGreater(int(model.lower_optimizer.iterations), 0)
        history = model.fit(x, saved["y"], batch_size=4, verbose=0)
        self.assertTrue(np.isfinite(history.history["loss"][0]))
