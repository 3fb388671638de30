import json
import os

import numpy as np
import pytest

from keras_bidora.data import IGNORE
from keras_bidora.data import TASKS
from keras_bidora.data import Encoder
from keras_bidora.data import get_task_spec
from keras_bidora.data import iob1_to_iob2
from keras_bidora.data import load_e2e
from keras_bidora.data import load_files
from keras_bidora.data import load_task
from keras_bidora.data import read_conll
from keras_bidora.data import resolve_preset
from keras_bidora.data.preprocessing import default_preset

# Rows per split, as files/README.md states them.
SHIPPED_ROWS = {
    "sst2": (2000, 872),
    "rte": (1000, 277),
    "mrpc": (1000, 408),
    "cola": (2138, 1043),
    "stsb": (1917, 1500),
    "conll2003": (472, 391),
}


# Task specs and shipped files ------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shipped_files_have_the_documented_rows(name):
    train_rows, dev_rows = SHIPPED_ROWS[name]
    train = load_task(name, "train")
    dev = load_task(name, "dev")
    assert (len(train), len(dev)) == (train_rows, dev_rows)
    spec = train.spec
    texts = train.texts
    if spec.pair:
        assert isinstance(texts, tuple) and len(texts) == 2
        assert len(texts[0]) == len(texts[1]) == train_rows
    if spec.kind == "classification":
        assert train.labels.dtype == np.int32
        assert set(np.unique(train.labels)) == set(range(spec.num_classes))
    if spec.kind == "regression":
        assert train.labels.dtype == np.float32
        assert 0 <= train.labels.min() and train.labels.max() <= 5


def test_readme_lists_every_shipped_file():
    from keras_bidora.data import FILES_DIR

    with open(os.path.join(FILES_DIR, "README.md")) as f:
        readme = f.read()
    for folder, _, files in os.walk(FILES_DIR):
        for file in files:
            path = os.path.relpath(os.path.join(folder, file), FILES_DIR)
            if path.endswith((".md", ".py")) or "__pycache__" in path:
                continue
            assert f"| {path} |" in readme, path


def test_glue_labels_and_texts():
    rte = load_task("rte", "train", limit=2)
    assert rte.texts[1][0] == "Weapons of Mass Destruction Found in Iraq."
    assert rte.labels.tolist() == [1, 0]  # not_entailment, entailment
    mrpc = load_task("mrpc", "dev", limit=1)
    assert mrpc.texts[0][0].startswith("He said the foodservice pie")
    cola = load_task("cola", "dev", limit=1)
    assert cola.texts == ["The sailors rode the breeze clear of the rocks."]
    stsb = load_task("stsb", "dev", limit=2)
    np.testing.assert_allclose(stsb.labels, [5.0, 4.75])
    assert get_task_spec("SST-2") is TASKS["sst2"]
    assert TASKS["stsb"].num_classes == 1


def test_conll_is_converted_to_iob2():
    data = load_task("conll2003", "train", limit=2)
    tags = [[data.spec.label_names[i] for i in s] for s in data.labels]
    assert data.texts[0] == [
        "EU", "rejects", "German", "call", "to", "boycott", "British",
        "lamb", ".",
    ]  # fmt: skip
    assert tags[0] == [
        "B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O",
    ]  # fmt: skip
    assert tags[1] == ["B-PER", "I-PER"]
    assert iob1_to_iob2(["I-PER", "B-PER", "I-PER", "O", "I-LOC"]) == [
        "B-PER", "B-PER", "I-PER", "O", "B-LOC",
    ]  # fmt: skip


def test_task_spec_scores():
    assert TASKS["cola"].score([1, 0, 1, 1], [1, 0, 1, 1]) == {
        "matthews_correlation": 1.0,
        "accuracy": 1.0,
    }
    scores = TASKS["stsb"].score([1.0, 2.0, 3.0], [1.5, 2.5, 2.8])
    assert list(scores) == ["pearson", "spearmanr"]
    ner = TASKS["conll2003"]
    scores = ner.score([np.array([1, 2, 0])], [np.array([1, 2, 0])])
    assert scores == {
        "f1": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "accuracy": 1.0,
    }
    config = ner.to_config()
    assert json.loads(json.dumps(config)) == config
    assert type(ner).from_config(config) == ner


def test_load_task_errors():
    with pytest.raises(ValueError, match="Unknown task 'qnli'"):
        load_task("qnli", "train")
    with pytest.raises(ValueError, match="split"):
        load_task("sst2", "test")
    with pytest.raises(ValueError, match="limit"):
        load_task("sst2", "train", limit=0)
    with pytest.raises(ValueError, match="no such file"):
        load_task("sst2", "train", data_dir="/nonexistent")


def test_e2e_prompts_and_responses(tmp_path):
    # Rows per split as files/README.md states them: 400 and 100.
    for split, rows in (("train", 400), ("dev", 100)):
        data = load_e2e(split)
        assert len(data["prompts"]) == len(data["responses"]) == rows
    folder = tmp_path / "e2e_nlg"
    folder.mkdir()
    _write(
        folder / "devset.csv",
        'mr,ref\n"name[Aromi], food[Chinese]","Aromi serves, Chinese food."\n',
    )
    data = load_e2e("dev", data_dir=str(tmp_path))
    assert data == {
        "prompts": ["name[Aromi], food[Chinese] => "],
        "responses": ["Aromi serves, Chinese food."],
    }
    _write(folder / "trainset.csv", "meaning,text\na,b\n")
    with pytest.raises(ValueError, match="'mr' and 'ref'.*'meaning'"):
        load_e2e("train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        load_e2e("test")


# Users' files -----------------------------------------------------------


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def test_load_files_csv_tsv_jsonl(tmp_path):
    train = _write(
        tmp_path / "train.csv",
        'review,rating\n"good, really",pos\nbad,neg\nfine,pos\n',
    )
    dev = _write(tmp_path / "dev.tsv", 'review\trating\n"quoted\tneg\n')
    train_data, dev_data = load_files(train, dev, "review", "rating")
    assert train_data.texts == ["good, really", "bad", "fine"]
    assert train_data.spec.label_names == ("neg", "pos")
    assert train_data.labels.tolist() == [1, 0, 1]
    # TSV is read without quoting, like the GLUE files.
    assert dev_data.texts == ['"quoted']
    assert dev_data.spec.metrics == ("accuracy", "f1")
    assert dev_data.spec.f1_average == "macro"

    pairs = _write(
        tmp_path / "pairs.jsonl",
        '{"a": "x", "b": "y", "score": 1.5}\n\n{"a": "z", "b": "w", '
        '"score": 3}\n',
    )
    train_data, dev_data = load_files(
        pairs, pairs, "a", "score", text_pair_column="b", kind="regression"
    )
    assert train_data.texts == (["x", "z"], ["y", "w"])
    np.testing.assert_allclose(dev_data.labels, [1.5, 3.0])
    assert train_data.spec.metrics == ("pearson", "spearmanr")


def test_numeric_labels_sort_as_numbers(tmp_path):
    train = _write(tmp_path / "t.csv", "text,label\na,10\nb,9\nc,2\n")
    train_data, _ = load_files(train, train, "text", "label")
    assert train_data.spec.label_names == ("2", "9", "10")


def test_load_files_errors(tmp_path):
    good = _write(tmp_path / "good.csv", "text,label\na,x\nb,y\n")
    empty = _write(tmp_path / "empty.csv", "text,label\n")
    blank = _write(tmp_path / "blank.jsonl", "\n")
    other = _write(tmp_path / "other.csv", "text,label\nc,z\n")
    one_class = _write(tmp_path / "one.csv", "text,label\nc,x\n")
    missing_label = _write(tmp_path / "missing.csv", "text,label\nc,\n")
    cases = [
        ((str(tmp_path / "nope.csv"), good), "nope.csv: no such file"),
        ((empty, good), "empty.csv is empty"),
        ((blank, good), "blank.jsonl is empty"),
        ((good, other), "label 'z' is not one of the model's classes"),
        ((one_class, good), "one class only"),
        ((missing_label, good), "row 1: empty label column 'label'"),
        ((_write(tmp_path / "x.parquet", "a"), good), "unknown file type"),
    ]
    for (train, dev), message in cases:
        with pytest.raises(ValueError, match=message):
            load_files(train, dev, "text", "label")
    with pytest.raises(ValueError, match="has no text column 'body'"):
        load_files(good, good, "body", "label")
    with pytest.raises(ValueError, match="has no text pair column 'b'"):
        load_files(good, good, "text", "label", text_pair_column="b")
    with pytest.raises(ValueError, match="is not a number"):
        load_files(good, good, "text", "label", kind="regression")
    with pytest.raises(ValueError, match="label 'z'"):
        load_files(None, other, "text", "label", label_names=["x", "y"])


def test_read_conll_errors(tmp_path):
    with pytest.raises(ValueError, match="has no sentences"):
        read_conll(_write(tmp_path / "a.txt", "-DOCSTART- -X- O O\n\n"))
    with pytest.raises(ValueError, match="line 1"):
        read_conll(_write(tmp_path / "b.txt", "word\n"))


def test_resolve_preset(tmp_path):
    assert resolve_preset(None) == default_preset()
    assert resolve_preset("bert_tiny_en_uncased") == "bert_tiny_en_uncased"
    with pytest.raises(ValueError, match="does not exist"):
        resolve_preset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_preset(str(tmp_path))


# Tokenization with the default model's tokenizer ------------------------


def test_encoder_single_and_pairs():
    preset = default_preset()
    sst2 = load_task("sst2", "dev", limit=5)
    encoder = Encoder(sst2.spec, preset, sequence_length=16)
    x, y = encoder.encode(sst2.texts, sst2.labels, batch_size=2)
    assert set(x) == {"token_ids", "segment_ids", "padding_mask"}
    assert x["token_ids"].shape == (5, 16)
    assert x["token_ids"][0, 0] == 101  # [CLS]
    assert y.tolist() == sst2.labels.tolist()

    rte = load_task("rte", "dev", limit=3)
    encoder = Encoder(rte.spec, preset, sequence_length=32)
    x, _ = encoder.encode(rte.texts)
    # Pairs go in as x=(a, b): the second text has segment id 1.
    assert x["segment_ids"].max() == 1
    assert x["token_ids"].shape == (3, 32)

    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]])
    assert encoder.decode(logits, rte.texts).tolist() == [1, 0, 1]


def test_encoder_token_classification():
    data = load_task("conll2003", "train", limit=2)
    encoder = Encoder(data.spec, default_preset(), sequence_length=8)
    x, y = encoder.encode(data.texts, data.labels)
    assert x["token_ids"].shape == y.shape == (2, 8)
    # Sentence 0: [CLS] eu rejects german call to boycott [SEP]: one piece
    # per word, the sequence cut after "boycott".
    starts = encoder.word_starts(data.texts)
    assert starts[0] == [1, 2, 3, 4, 5, 6, -1, -1, -1]
    assert y[0].tolist() == [IGNORE] + data.labels[0][:6].tolist() + [IGNORE]
    assert x["token_ids"][0, -1] == 102 and x["padding_mask"][0].all()
    # Sentence 1 is padded; only the two word starts carry labels.
    assert (y[1] != IGNORE).sum() == 2
    # Cut-off words are predicted as tag 0 ("O").
    outputs = np.zeros((2, 8, 9))
    outputs[0, 1, 3] = 1.0
    predictions = encoder.decode(outputs, data.texts)
    assert predictions[0].tolist() == [3, 0, 0, 0, 0, 0, 0, 0, 0]
    assert len(predictions[1]) == 2


# Heads --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=12,
    )
    folder = str(tmp_path_factory.mktemp("tiny_bert"))
    backbone.save_to_preset(folder)
    return folder


def test_mean_pooled_head_averages_the_unpadded_tokens(tiny_preset, tmp_path):
    import keras

    from keras_bidora import BiDoRAModel
    from keras_bidora.data import build_model

    spec = get_task_spec("mrpc")
    model, backbone = build_model(spec, tiny_preset, pooling="mean")
    assert model.backbone is backbone
    rng = np.random.default_rng(0)
    lengths = np.array([3, 12, 7])
    mask = np.arange(12)[None, :] < lengths[:, None]
    x = {
        "token_ids": rng.integers(1, 50, (3, 12)) * mask,
        "segment_ids": np.zeros((3, 12), "int32"),
        "padding_mask": mask,
    }
    sequence = keras.ops.convert_to_numpy(backbone(x)["sequence_output"])
    pooled = np.stack([sequence[i, :n].mean(0) for i, n in enumerate(lengths)])
    kernel, bias = model.get_layer("logits").get_weights()
    expected = pooled @ kernel + bias
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-5)
    # Adapted, saved and loaded, it predicts the same.
    adapted = BiDoRAModel(model, rank=2)
    path = str(tmp_path / "mean.keras")
    adapted.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(
        keras.Model.predict(restored, x, verbose=0), expected, atol=1e-5
    )


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_regression_head_starts_at_the_targets_mean(tiny_preset, pooling):
    import keras_hub

    from keras_bidora.data import build_model
    from keras_bidora.data import initial_output_bias

    spec = get_task_spec("stsb")
    targets = np.random.default_rng(1).uniform(0, 5, 40).astype("float32")
    bias = initial_output_bias(spec, targets)
    assert bias == pytest.approx(float(np.mean(targets.astype("float64"))))
    model, _ = build_model(spec, tiny_preset, pooling=pooling, output_bias=bias)
    # The head that `pooling` names, not the other.
    assert isinstance(model, keras_hub.models.TextClassifier) == (
        pooling == "cls"
    )
    np.testing.assert_allclose(
        model.get_layer("logits").bias.numpy(), [targets.mean()], rtol=1e-6
    )
    # The outputs are the zero-bias head's plus the mean.
    plain, _ = build_model(spec, tiny_preset, pooling=pooling)
    plain.set_weights(model.get_weights())
    plain.get_layer("logits").bias.assign(np.zeros(1, "float32"))
    x = {
        "token_ids": np.array([[2, 5, 7, 3, 0, 0]]),
        "segment_ids": np.zeros((1, 6), "int32"),
        "padding_mask": np.array([[1, 1, 1, 1, 0, 0]], bool),
    }
    np.testing.assert_allclose(
        model.predict(x, verbose=0),
        plain.predict(x, verbose=0) + targets.mean(),
        rtol=1e-5,
    )


def test_output_bias_is_none_for_labels_and_checked_for_shape(tiny_preset):
    from keras_bidora.data import build_model
    from keras_bidora.data import initial_output_bias

    assert initial_output_bias(get_task_spec("mrpc"), [0, 1, 1]) is None
    with pytest.raises(ValueError, match=r"shape \(0,\)"):
        initial_output_bias(get_task_spec("stsb"), [])
    mrpc = get_task_spec("mrpc")
    model, _ = build_model(
        mrpc, tiny_preset, pooling="mean", output_bias=[0.5, -1]
    )
    assert model.name == "mean_pooled_classifier"
    np.testing.assert_array_equal(
        model.get_layer("logits").bias.numpy(), [0.5, -1]
    )
    for bad in ([1.0, 2.0, 3.0], float("nan")):
        with pytest.raises(ValueError, match="output_bias="):
            build_model(mrpc, tiny_preset, pooling="mean", output_bias=bad)


def test_build_model_refuses_an_unknown_pooling(tiny_preset):
    from keras_bidora.data import build_model

    with pytest.raises(ValueError, match="pooling='max'"):
        build_model(get_task_spec("mrpc"), tiny_preset, pooling="max")
