"""Fine-tune a KerasHub causal LM with BiDoRA on E2E NLG, from raw text.

The KerasHub LoRA flow with one line changed: the `CausalLM` (its own
preprocessor included) goes into a `BiDoRAModel`, which then takes raw
prompt/response strings in `fit`, and `generate`s with the trained
adapters. The data is the paper's NLG task, E2E: a meaning representation
(the prompt) and its reference text (the response); the prompt's tokens
are masked out of the loss.

    KERAS_BACKEND=jax python examples/causal_lm_bidora.py
    python examples/causal_lm_bidora.py --preset DIR   # a CausalLM preset

Without `--preset`, the model is a tiny random GPT-2 with a character-level
byte-pair tokenizer (no pretrained causal LM can be downloaded here), so
what it generates shows the flow, not quality. With a real preset (e.g.
`keras_hub.models.GPT2CausalLM.from_preset("gpt2_base_en")` saved with
`save_to_preset`), the same code fine-tunes it.
"""

import argparse
import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import keras_hub  # noqa: E402

import keras_bidora  # noqa: E402
from keras_bidora.data import load_e2e  # noqa: E402

MAX_LENGTH = 160  # prompt and generated tokens together


def tiny_gpt2(sequence_length):
    """A random 2-layer GPT-2 with a character-level byte-pair tokenizer."""
    characters = ["\u0120"] + [chr(code) for code in range(33, 127)]
    vocabulary = {"<|endoftext|>": 0}
    for token in characters + ["\u0120t", "th"]:
        vocabulary[token] = len(vocabulary)
    # Two merges: KerasHub's byte-pair tokenizer needs at least one.
    merges = ["\u0120 t", "t h"]
    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=merges
    )
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=sequence_length,
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help="a CausalLM preset directory")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    if args.preset:
        task = keras_hub.models.CausalLM.from_preset(args.preset)
        task.preprocessor.sequence_length = MAX_LENGTH
    else:
        task = tiny_gpt2(sequence_length=MAX_LENGTH)
    data = load_e2e("train", limit=args.rows)

    # The one-line change: wrap the task (BiDoRA injects its adapters).
    model = keras_bidora.BiDoRAModel(task, rank=4)
    model.compile(optimizer=keras.optimizers.AdamW(5e-3), sampler="greedy")
    model.fit(data, batch_size=8, epochs=args.epochs, verbose=2)
    model.retrain(data, batch_size=8, epochs=1, verbose=2)

    prompt = data["prompts"][0]
    print("generated:", model.generate(prompt, max_length=MAX_LENGTH))

    path = os.path.join(tempfile.mkdtemp(), "e2e.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    print("reloaded: ", restored.generate(prompt, max_length=MAX_LENGTH))

    merged = keras_bidora.merge(model)  # the plain GPT2CausalLM
    print("merged:   ", merged.generate(prompt, max_length=MAX_LENGTH))


if __name__ == "__main__":
    main()
