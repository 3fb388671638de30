"""Saves a BiDoRAModel .keras file with keras-bidora 0.1.0 (commit 8d674bc).

Run with that commit first on the path (`PYTHONPATH=CHECKOUT python
tests/data/make_legacy_files.py tests/data/bidora_model_0_1_0`); writes the
file and the outputs it gave then, for tests/test_legacy_files.py.
"""

import sys

import keras
import keras_hub
import numpy as np

import keras_bidora

out = sys.argv[1]
keras.utils.set_random_seed(0)
backbone = keras_hub.models.BertBackbone(
    vocabulary_size=50,
    num_layers=1,
    num_heads=2,
    hidden_dim=8,
    intermediate_dim=16,
    max_sequence_length=8,
)
task = keras_hub.models.BertTextClassifier(
    backbone, num_classes=2, preprocessor=None
)
# alpha left at its default (then alpha = rank), as most saved files did.
model = keras_bidora.BiDoRAModel(task, rank=2, seed=0)
model.compile(
    optimizer=keras.optimizers.AdamW(1e-2),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
rng = np.random.default_rng(0)
x = {
    "token_ids": rng.integers(1, 50, (20, 8)).astype("int32"),
    "segment_ids": np.zeros((20, 8), "int32"),
    "padding_mask": np.ones((20, 8), "bool"),
}
y = rng.integers(0, 2, (20,))
model.fit(x, y, batch_size=4, epochs=1, verbose=0)
model.save(f"{out}.keras")
outputs = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
np.savez(f"{out}.npz", y=y, outputs=outputs, **x)
print(outputs[:2])
