"""Tests of the `keras-bidora` command.

Most run `main()` in this process (Keras is already imported with the
backend under test); one bad-input case and the end-to-end training run
the real command in a subprocess with the same KERAS_BACKEND.
"""

import json
import os
import re
import subprocess
import sys

import keras
import keras_hub  # noqa: F401  (registers KerasHub classes for loading)
import numpy as np
import pytest

from keras_bidora import cli
from keras_bidora.cli import outputs
from keras_bidora.data import Encoder
from keras_bidora.data import TaskSpec
from keras_bidora.data import load_task
from tests.test_case import save_tiny_bert_preset

BACKEND = keras.config.backend()
# Lines TensorFlow's and XLA's C++ logging print to stderr on import,
# before any Python code can silence them.
NATIVE_LOG = re.compile(
    r"^(WARNING: All log messages before absl|[IWEF]\d{4} |"
    r"To enable the following instructions)"
)
TINY = [
    "--train-limit", "48",
    "--dev-limit", "24",
    "--epochs", "1",
    "--sequence-length", "16",
    "--batch-size", "16",
    "--rank", "2",
    "--verbose", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    """A 1-layer random BERT with the default tokenizer: for the runs that
    check the command's files and bookkeeping, not what the model learns
    (`test_train_bidora_end_to_end` trains the real default model)."""
    return str(save_tiny_bert_preset(tmp_path_factory.mktemp("tiny_bert")))


def run_command(*args, cwd=None, env=None):
    env = dict(
        os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3", **env or {}
    )
    return subprocess.run(
        [sys.executable, "-m", "keras_bidora", *[str(a) for a in args]],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


def python_lines(stderr):
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not NATIVE_LOG.match(line)
    ]


def run_main(capsys, *args):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


# Help -------------------------------------------------------------------


def test_help_explains_every_option(capsys):
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"train", "demo", "evaluate", "predict", "generate"}
    for name, command in commands.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for action in command._actions:
            for option in action.option_strings:
                assert option in text, (name, option)
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.option_strings)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "train" in capsys.readouterr().out


def test_upper_batch_size_reaches_finetune():
    from keras_bidora.cli import inputs

    parser = cli.build_parser()
    for flags, expected in (
        ([], None),
        (["--upper-batch-size", "8"], 8),
        (["--upper-batch-size", "proportional"], "proportional"),
    ):
        args = parser.parse_args(
            ["train", "--task", "sst2", "--out", "unused", *flags]
        )
        settings = inputs.recipe_settings(args)
        assert settings["upper_batch_size"] == expected, flags


def test_early_stopping_min_steps_reach_finetune():
    from keras_bidora.cli import inputs
    from keras_bidora.cli.parser import UsageError

    parser = cli.build_parser()
    command = ["train", "--task", "sst2", "--out", "unused"]
    args = parser.parse_args(command)
    assert inputs.recipe_settings(args)["early_stopping_min_steps"] == 0
    args = parser.parse_args(
        [*command, "--early-stopping-patience", "2"]
        + ["--early-stopping-min-steps", "300"]
    )
    settings = inputs.recipe_settings(args)
    assert settings["early_stopping_min_steps"] == 300
    assert settings["early_stopping_patience"] == 2
    for flag in ("--early-stopping-min-steps", "--retrain-epochs"):
        with pytest.raises(UsageError, match="non-negative integer, got '-1'"):
            parser.parse_args([*command, flag, "-1"])


# Bad input --------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    return {
        "good": write(folder / "good.csv", "text,label\ngood,pos\nbad,neg\n"),
        "empty": write(folder / "empty.csv", "text,label\n"),
        "other": write(folder / "other.csv", "text,label\nso so,meh\n"),
        "missing": str(folder / "missing.csv"),
    }


def user(train, dev, *extra):
    return [
        "train", "--train", train, "--dev", dev,
        "--text-column", "text", "--label-column", "label", *extra,
    ]  # fmt: skip


BAD_INPUT = {
    "unknown task": (
        lambda f: ["train", "--task", "qnli", "--method", "lora"],
        "Unknown task 'qnli'",
    ),
    "unknown method": (
        lambda f: ["train", "--task", "sst2", "--method", "adalora"],
        "unknown method 'adalora'",
    ),
    "missing file": (
        lambda f: user(f["missing"], f["good"]),
        "missing.csv: no such file",
    ),
    "empty file": (
        lambda f: user(f["empty"], f["good"]),
        "empty.csv is empty",
    ),
    "missing column": (
        lambda f: user(f["good"], f["good"], "--text-pair-column", "other"),
        "has no text pair column 'other'",
    ),
    "label outside the classes": (
        lambda f: user(f["good"], f["other"]),
        "label 'meh' is not one of the model's classes (neg, pos)",
    ),
    "user data without dev": (
        lambda f: ["train", "--train", f["good"], "--text-column", "text"],
        "needs --dev, --label-column as well",
    ),
    "preset folder missing": (
        lambda f: ["train", "--task", "sst2", "--preset", "./no/such/dir"],
        "Preset folder ./no/such/dir does not exist",
    ),
    "unknown preset name": (
        lambda f: ["train", "--task", "sst2", "--preset", "no_such_preset"],
        "Cannot load the preprocessor of preset 'no_such_preset'",
    ),
    "bad number": (
        lambda f: ["train", "--task", "sst2", "--rank", "0"],
        "argument --rank: expected a positive integer",
    ),
    "bad upper batch size": (
        lambda f: ["train", "--task", "sst2", "--upper-batch-size", "half"],
        "argument --upper-batch-size: expected a positive integer or "
        "'proportional', got 'half'",
    ),
    "bad choice": (
        lambda f: ["train", "--task", "sst2", "--backend", "numpy"],
        "argument --backend: invalid choice",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case, files, tmp_path, capsys
):
    make_args, message = BAD_INPUT[case]
    out = tmp_path / "out"
    args = make_args(files)
    if args[0] == "train":
        args += ["--out", str(out)]
    code, stdout, stderr = run_main(capsys, *args)
    assert code == 2
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("keras-bidora: error: ")
    assert message in lines[0]
    assert "Traceback" not in stdout + stderr
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_out_not_empty_is_kept(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    write(out / "keep.txt", "mine")
    code, _, stderr = run_main(capsys, "train", "--task", "sst2", "--out", out)
    assert code == 2
    assert "exists and is not empty; pass --overwrite" in stderr
    assert os.listdir(out) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_evaluate_and_predict_bad_input(tmp_path, capsys):
    code, _, stderr = run_main(
        capsys, "evaluate", "--model", tmp_path / "model.keras"
    )
    assert code == 2 and "model.keras: no such file" in stderr
    write(tmp_path / "model.keras", "")
    code, _, stderr = run_main(
        capsys, "predict", "--model", tmp_path / "model.keras", "hi"
    )
    assert code == 2 and "model.json is missing" in stderr
    code, _, stderr = run_main(capsys, "evaluate")
    assert code == 2 and "required: --model" in stderr


def test_bad_input_from_the_real_command(tmp_path):
    out = tmp_path / "out"
    result = run_command(
        "train", "--task", "qnli", "--backend", BACKEND, "--out", out
    )
    assert result.returncode == 2
    assert python_lines(result.stderr) == [
        "keras-bidora: error: Unknown task 'qnli'. Known tasks: sst2, rte, "
        "mrpc, cola, stsb, conll2003"
    ]
    assert not out.exists()


@pytest.mark.skipif(BACKEND == "jax", reason="the jax backend takes it")
def test_jax_compilation_cache_refused_on_other_backends(tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    code, _, err = run_main(
        capsys, "train", "--task", "sst2", "--backend", BACKEND,
        "--jax-compilation-cache", cache, "--out", out, *TINY,
    )  # fmt: skip
    assert code == 2
    assert err.strip() == (
        "keras-bidora: error: --jax-compilation-cache is for the jax "
        f"backend. Received: --jax-compilation-cache {cache} with the "
        f"{BACKEND} backend"
    )
    assert not out.exists() and not cache.exists()


@pytest.mark.large
@pytest.mark.skipif(
    BACKEND != "jax", reason="runs the jax backend; once per test suite"
)
def test_jax_compilation_cache_is_reused(tmp_path, tiny_preset):
    # JAX caches programs that took over a second to compile by default;
    # caching every program makes the tiny run's programs count.
    env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cache = tmp_path / "cache"
    entries = []
    for run in ("first", "second"):
        result = run_command(
            "train", "--task", "sst2", "--method", "dora",
            "--out", tmp_path / run, "--jax-compilation-cache", cache,
            "--preset", tiny_preset, *TINY, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        entries.append(set(os.listdir(cache)))
    assert entries[0], "the first run cached no program"
    # The second run compiled nothing new: every program came from disk.
    assert entries[1] == entries[0]


# Training end to end ----------------------------------------------------


def reload_and_score(folder):
    """Scores the saved model on dev as metrics.json says it did."""
    with open(folder / "metrics.json") as f:
        metrics = json.load(f)
    with open(folder / "model.json") as f:
        info = json.load(f)
    model = keras.saving.load_model(folder / "model.keras")
    for layer in model._flatten_layers():
        assert not type(layer).__module__.startswith("keras_bidora")
    spec = TaskSpec.from_config(info["task"])
    encoder = Encoder(
        spec,
        info["preset"],
        info["sequence_length"],
        input_names=info["input_names"],
    )
    dev = load_task(spec.name, "dev", limit=metrics["dev_examples"])
    x, _ = encoder.encode(dev.texts)
    outputs = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    scores = spec.score(dev.labels, encoder.decode(outputs, dev.texts))
    return metrics, scores


@pytest.mark.large
def test_train_bidora_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    result = run_command(
        "train", "--task", "sst2", "--method", "bidora", "--out", out,
        "--hypergradient", "first_order", "--retrain-epochs", "1", *TINY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[bidora] dev: accuracy" in result.stdout
    assert sorted(os.listdir(out)) == [
        "adapter.npz",
        "metrics.json",
        "model.json",
        "model.keras",
        "training.png",
    ]
    assert sorted(os.listdir(tmp_path)) == ["run"]
    metrics, scores = reload_and_score(out)
    assert list(metrics["dev"]) == ["accuracy"]
    assert scores == pytest.approx(metrics["dev"], abs=1e-6)
    assert metrics["versions"]["backend"] == BACKEND
    assert metrics["arguments"]["method"] == "bidora"
    assert set(metrics["epochs"]) == {"bilevel", "retrain"}
    assert set(metrics["epochs"]["bilevel"]) >= {
        "loss",
        "upper_loss",
        "val_loss",
    }
    # 48 examples: 38 lower (3 batches of 16) and 10 upper; 3 retrain.
    assert metrics["steps"] == {"bilevel": 3, "retrain": 3}
    assert metrics["parameters"]["magnitude"] > 0
    assert metrics["merge_max_abs_difference"] < 1e-4
    with open(out / "training.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"

    # evaluate and predict read the saved model and model.json.
    code, stdout, _ = run_main(
        capsys, "evaluate", "--model", out / "model.keras",
        "--dev-limit", "24",
    )  # fmt: skip
    assert code == 0
    assert json.loads(stdout)["dev"] == pytest.approx(metrics["dev"])
    code, stdout, _ = run_main(
        capsys, "predict", "--model", out / "model.keras", "--json",
        "a gorgeous, witty film", "dull",
    )  # fmt: skip
    assert code == 0
    records = json.loads(stdout)
    assert [r["text"] for r in records] == ["a gorgeous, witty film", "dull"]
    assert {r["label"] for r in records} <= {"negative", "positive"}
    code, _, stderr = run_main(
        capsys, "evaluate", "--model", out / "model.keras", "--task", "cola"
    )
    assert code == 2 and "are not the model's classes" in stderr

    # --overwrite replaces the folder only once the new run succeeded.
    code, _, stderr = run_main(
        capsys, "train", "--task", "sst2", "--method", "lora", "--out", out,
        "--overwrite", "--preset", "no_such_preset",
    )  # fmt: skip
    assert code == 2
    assert "model.keras" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["run"]


@pytest.mark.large
def test_train_keras_lora_on_pairs_from_files(tmp_path, capsys, tiny_preset):
    rows = [
        ("a man plays a guitar", "someone plays music", "yes"),
        ("a cat sleeps", "the stock market fell", "no"),
    ] * 12
    text = "first,second,same\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows)
    data = write(tmp_path / "pairs.csv", text)
    out = tmp_path / "run"
    code, stdout, stderr = run_main(
        capsys, "train", "--train", data, "--dev", data,
        "--text-column", "first", "--text-pair-column", "second",
        "--label-column", "same", "--method", "keras-lora", "--out", out,
        "--no-validation", "--preset", tiny_preset, *TINY,
    )  # fmt: skip
    assert code == 0, stderr
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert list(metrics["dev"]) == ["accuracy", "f1"]
    assert metrics["merge_max_abs_difference"] < 1e-4
    assert "adapter.lora.h5" in os.listdir(out)
    model = keras.saving.load_model(out / "model.keras")
    for layer in model._flatten_layers():
        assert not getattr(layer, "lora_enabled", False)
    # evaluate finds the columns in model.json; predict reads pairs.
    code, stdout, _ = run_main(
        capsys, "evaluate", "--model", out / "model.keras", "--dev", data
    )
    assert code == 0
    assert json.loads(stdout)["dev"] == pytest.approx(metrics["dev"])
    code, stdout, _ = run_main(
        capsys, "predict", "--model", out / "model.keras",
        "a dog runs ||| an animal moves",
    )  # fmt: skip
    assert code == 0 and stdout.split("\t")[0] in ("no", "yes")
    code, _, stderr = run_main(
        capsys, "predict", "--model", out / "model.keras", "no separator"
    )
    assert code == 2 and "write each TEXT as 'first ||| second'" in stderr


@pytest.mark.large
def test_train_dora_regression(tmp_path, capsys, tiny_preset):
    out = tmp_path / "run"
    code, _, stderr = run_main(
        capsys, "train", "--task", "stsb", "--method", "dora",
        "--out", out, "--no-validation", "--preset", tiny_preset, *TINY,
        "--epochs", "4",
        "--pooling", "mean", "--early-stopping-patience", "1",
    )  # fmt: skip
    assert code == 0, stderr
    metrics, scores = reload_and_score(out)
    assert list(metrics["dev"]) == ["pearson", "spearmanr"]
    assert scores == pytest.approx(metrics["dev"], abs=1e-5)
    assert metrics["parameters"]["magnitude"] > 0
    # The head averages the tokens; early stopping watched the held-out
    # training data (val_loss) and kept its best epoch.
    model = keras.saving.load_model(out / "model.keras")
    assert model.get_layer("mean_pooling") is not None
    watched = metrics["epochs"]["train"]["val_loss"]
    assert 2 <= len(watched) <= 4
    best = int(np.argmin(watched))
    assert metrics["best_epochs"] == {"train": best + 1}
    assert metrics["stopping_loss"]["train"] == pytest.approx(watched[best])
    assert len(watched) == 4 or len(watched) == best + 2


@pytest.mark.large
def test_train_lora_ner(tmp_path, capsys, tiny_preset):
    out = tmp_path / "run"
    code, _, stderr = run_main(
        capsys, "train", "--task", "conll2003", "--method", "lora",
        "--out", out, "--preset", tiny_preset, *TINY,
    )  # fmt: skip
    assert code == 0, stderr
    metrics, scores = reload_and_score(out)
    assert list(metrics["dev"]) == ["f1", "precision", "recall", "accuracy"]
    assert scores == pytest.approx(metrics["dev"], abs=1e-6)
    assert metrics["parameters"]["magnitude"] == 0
    code, stdout, _ = run_main(
        capsys, "predict", "--model", out / "model.keras", "EU rejects it"
    )
    assert code == 0
    words, tags = zip(*(pair.split("/") for pair in stdout.split()))
    assert words == ("EU", "rejects", "it")
    assert set(tags) <= set(
        TaskSpec.from_config(
            json.loads((out / "model.json").read_text())["task"]
        ).label_names
    )


def test_demo_table():
    spec = TaskSpec(name="t", kind="classification", label_names=("a", "b"))
    results = [
        {
            "method": "lora",
            "dev": {"accuracy": 0.5},
            "parameters": {"trainable": 1000},
            "wall_time_s": {"train": 3.0},
        },
        {
            "method": "bidora",
            "dev": {"accuracy": 0.75},
            "parameters": {"trainable": 1200},
            "wall_time_s": {"train": 9.0},
        },
    ]
    table = outputs.demo_table(results, spec).splitlines()
    assert table[0].split() == [
        "method",
        "dev",
        "accuracy",
        "trainable",
        "params",
        "train",
        "time",
        "(s)",
    ]
    assert table[2].split() == ["lora", "0.5000", "1,000", "3"]
    assert table[3].split() == ["bidora", "0.7500", "1,200", "9"]
    np.testing.assert_allclose(outputs.smooth([1.0, 3.0], 2), [1.0, 2.0])


# Without matplotlib -----------------------------------------------------

NO_MATPLOTLIB = (
    "keras-bidora: matplotlib is not installed, so {} was not drawn; pip "
    "install keras-bidora[cli] to get plots"
)


@pytest.mark.large
def test_train_without_matplotlib_writes_everything_else(
    tmp_path, capsys, monkeypatch, tiny_preset
):
    # Only this key is restored afterwards (patching all of sys.modules
    # would drop the modules the run imports).
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run"
    code, _, stderr = run_main(
        capsys, "train", "--task", "sst2", "--method", "lora", "--out", out,
        "--no-validation", "--preset", tiny_preset, *TINY,
    )  # fmt: skip
    assert code == 0, stderr
    files = os.listdir(out)
    assert "metrics.json" in files and "model.keras" in files
    assert "training.png" not in files
    assert NO_MATPLOTLIB.format("training.png") in stderr.splitlines()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "plot" not in metrics["files"]


def test_demo_files_with_and_without_matplotlib(tmp_path, capsys, monkeypatch):
    spec = TaskSpec(name="t", kind="classification", label_names=("a", "b"))
    results = [
        {
            "method": "lora",
            "dev": {"accuracy": 0.5},
            "batch_loss": {"train": [0.7, 0.6, 0.5]},
        }
    ]
    assert outputs.write_demo(tmp_path / "with", {}, results, spec)
    assert sorted(os.listdir(tmp_path / "with")) == ["demo.json", "demo.png"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not outputs.write_demo(tmp_path / "without", {}, results, spec)
    assert os.listdir(tmp_path / "without") == ["demo.json"]
    assert capsys.readouterr().err.splitlines() == [
        NO_MATPLOTLIB.format("demo.png")
    ]
