"""Fine-tune MiniLM-L6 on SST-2 with BiDoRA, in Python.

The same as `keras-bidora train --task sst2 --method bidora`, written out
with the library's API: tokenize once, wrap the KerasHub classifier in a
`BiDoRAModel`, run the bi-level phase then the retrain phase, score on dev,
and save the merged model.

    KERAS_BACKEND=jax python examples/sst2_bidora.py

Takes a few minutes on a laptop CPU.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402

import keras_bidora  # noqa: E402
from keras_bidora import data  # noqa: E402

keras.utils.set_random_seed(0)
train = data.load_task("sst2", "train", limit=1000)
dev = data.load_task("sst2", "dev")
spec = train.spec  # 2 classes, scored by accuracy

# Tokenize once into NumPy token-id dicts; the model then runs without a
# preprocessor, so each step only runs the network.
preset = data.default_preset()  # the offline MiniLM-L6 BERT
encoder = data.Encoder(spec, preset, sequence_length=48)
x_train, y_train = encoder.encode(train.texts, train.labels)
x_dev, y_dev = encoder.encode(dev.texts, dev.labels)

# A KerasHub BertTextClassifier with a fresh head and preprocessor=None.
classifier, _ = data.build_model(spec, preset)
model = keras_bidora.BiDoRAModel(
    classifier,
    rank=8,
    alpha=16,
    upper_fraction=0.2,  # 20% of train data trains the magnitudes
    hypergradient="first_order",
    seed=0,
)
print(keras_bidora.summary(model))
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
model.compile(
    optimizer=keras.optimizers.AdamW(2e-3, weight_decay=0.0),
    upper_optimizer=keras.optimizers.AdamW(2e-3, weight_decay=0.0),
    loss=loss,
    metrics=["accuracy"],
)
model.fit(x_train, y_train, batch_size=32, epochs=2)  # bi-level phase
# Retrain the direction on all the data with the magnitudes frozen, from
# where the bi-level phase left it (the official code starts it afresh,
# which needs about as many epochs as the first phase).
model.retrain(
    x_train, y_train, batch_size=32, epochs=1, reinitialize_direction=False
)

predictions = encoder.decode(model.predict(x_dev, batch_size=64), dev.texts)
print("dev", spec.score(dev.labels, predictions))

# A plain Keras model with the adapters merged into its kernels, and the
# adapters alone.
os.makedirs("sst2_bidora", exist_ok=True)
keras_bidora.merge(model).save("sst2_bidora/model.keras")
keras_bidora.save_adapter_weights(model, "sst2_bidora/adapter.npz")
