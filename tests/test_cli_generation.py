"""`keras-bidora train --task e2e` and `keras-bidora generate`.

No pretrained causal LM can be downloaded here, so the preset is a tiny
random GPT-2 that the test saves with `save_to_preset`. References: the
scores recomputed with sacrebleu and rouge-score from the written
generations, and the saved model's own `generate`.
"""

import json
import os

import keras
import keras_hub
import pytest

from keras_bidora import recipes
from keras_bidora.data import load_e2e
from tests.test_cli import run_main
from tests.test_kerashub_flow import causal_lm

SEQUENCE_LENGTH = 192
TINY = [
    "--task", "e2e",
    "--train-limit", "16",
    "--dev-limit", "12",
    "--epochs", "1",
    "--retrain-epochs", "1",
    "--sequence-length", str(SEQUENCE_LENGTH),
    "--batch-size", "4",
    "--rank", "2",
    "--lr", "1e-2",
    "--verbose", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """A tiny random GPT2CausalLM preset folder."""
    keras.utils.set_random_seed(0)
    task = causal_lm(SEQUENCE_LENGTH, max_sequence_length=SEQUENCE_LENGTH)
    folder = str(tmp_path_factory.mktemp("preset") / "tiny_gpt2")
    task.save_to_preset(folder)
    return folder


def test_train_e2e_then_generate(preset, tmp_path, capsys, monkeypatch):
    sacrebleu = pytest.importorskip("sacrebleu")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    dev = load_e2e("dev", limit=12)
    first_reference = dict(reversed(list(zip(*dev.values()))))
    # A tiny random model writes (next to) nothing; so that the scores
    # are not 0 = 0, every other dev completion gets its first reference
    # appended on the way to scoring. `real` keeps what the model wrote.
    real = {}

    def complete(model, prompts, **kwargs):
        written = original(model, prompts, **kwargs)
        real.update(zip(prompts, written))
        return [
            f"{text} {first_reference[prompt]}" if index % 2 else text
            for index, (prompt, text) in enumerate(zip(prompts, written))
        ]

    original = recipes.complete
    monkeypatch.setattr(recipes, "complete", complete)
    out = tmp_path / "run"
    code, stdout, stderr = run_main(
        capsys, "train", *TINY, "--preset", preset, "--out", out
    )
    monkeypatch.undo()
    assert code == 0, stderr
    assert "[bidora] dev: bleu" in stdout
    assert sorted(os.listdir(out)) == [
        "generations.jsonl",
        "metrics.json",
        "model.json",
        "model.keras",
    ]
    with open(out / "metrics.json") as f:
        result = json.load(f)
    with open(out / "generations.jsonl") as f:
        records = [json.loads(line) for line in f]

    # One record per distinct dev prompt, with all of its references.
    assert [r["prompt"] for r in records] == list(dict.fromkeys(dev["prompts"]))
    for record in records:
        expected = [
            response
            for prompt, response in zip(dev["prompts"], dev["responses"])
            if prompt == record["prompt"]
        ]
        assert record["references"] == expected

    # The scores, recomputed by the libraries from what was written.
    hypotheses = [r["completion"] for r in records]
    most = max(len(r["references"]) for r in records)
    streams = [
        [
            r["references"][i] if i < len(r["references"]) else None
            for r in records
        ]
        for i in range(most)
    ]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = sum(
        scorer.score_multi(r["references"], r["completion"])["rougeL"].fmeasure
        for r in records
    ) / len(records)
    assert bleu > 0 and rouge > 0
    assert result["dev"]["bleu"] == pytest.approx(bleu, abs=1e-9)
    assert result["dev"]["rouge_l"] == pytest.approx(rouge, abs=1e-9)
    # 16 rows, 3 (20%) held out: 13 lower rows in batches of 4.
    assert result["steps"]["bilevel"] == 4
    assert result["sequence_length"] == SEQUENCE_LENGTH

    # The saved model is a plain GPT2CausalLM with its preprocessor, and
    # `generate` prints what the run wrote for the same prompt.
    model = keras.saving.load_model(out / "model.keras")
    assert isinstance(model, keras_hub.models.GPT2CausalLM)
    prompt = records[0]["prompt"]
    text = model.generate([prompt])[0]
    assert text.startswith(prompt)
    assert text[len(prompt) :].strip() == real[prompt]
    code, stdout, stderr = run_main(
        capsys, "generate", "--model", out / "model.keras", prompt
    )
    assert code == 0, stderr
    assert stdout == real[prompt] + "\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "lora"], "trains with --method dora or bidora"),
        ([], "needs --preset"),
        (["--preset", "PRESET", "--train", "x.csv"], "reads its own data"),
    ],
)
def test_train_e2e_bad_input(preset, extra, message, tmp_path, capsys):
    extra = [preset if arg == "PRESET" else arg for arg in extra]
    if "--method" in extra:
        extra += ["--preset", preset]
    out = tmp_path / "out"
    code, _, stderr = run_main(capsys, "train", *TINY, *extra, "--out", out)
    assert code == 2
    assert message in stderr
    assert not out.exists()


def test_generate_bad_input(tmp_path, capsys):
    code, _, stderr = run_main(
        capsys, "generate", "--model", tmp_path / "none.keras", "a"
    )
    assert code == 2 and "no such file" in stderr
    classifier = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    path = tmp_path / "dense.keras"
    classifier.save(path)
    code, _, stderr = run_main(capsys, "generate", "--model", path, "a")
    assert code == 2 and "does not generate text" in stderr
    info = {"task": {"name": "e2e", "kind": "generation"}}
    with open(tmp_path / "model.json", "w") as f:
        json.dump(info, f)
    code, _, stderr = run_main(capsys, "predict", "--model", path, "a")
    assert code == 2 and "use `keras-bidora generate" in stderr
