"""The command line's input checks: data, presets and saved models.

Nothing here imports Keras, so that bad input fails fast, before a
backend is loaded, with one line on stderr and exit code 2.
"""

import json
import os

import numpy as np

from keras_bidora import config
from keras_bidora.cli.parser import UsageError
from keras_bidora.data import loaders
from keras_bidora.data import preprocessing

MODEL_INFO_FILE = "model.json"


def check_method(method):
    if method not in config.METHODS:
        raise UsageError(
            f"unknown method {method!r}; choose one of "
            f"{', '.join(config.METHODS)}"
        )


def check_retrain_epochs(retrain_epochs):
    if retrain_epochs < 0:
        raise UsageError("--retrain-epochs must be >= 0")


def load_training_data(args):
    """Checks and loads the train and dev data named on the command line."""
    user_files = [args.train, args.dev, args.text_column, args.label_column]
    if any(v is not None for v in user_files + [args.text_pair_column]):
        return _load_user_files(args, user_files)
    if args.task is None:
        raise UsageError("give --task, or --train and --dev with your data")
    if args.task in config.FILE_TASK_KINDS:
        raise UsageError(
            f"--task {args.task} is for your own data: give --train, --dev, "
            "--text-column and --label-column"
        )
    try:
        train = loaders.load_task(
            args.task, "train", limit=args.train_limit, data_dir=args.data_dir
        )
        dev = loaders.load_task(
            args.task, "dev", limit=args.dev_limit, data_dir=args.data_dir
        )
    except ValueError as error:
        raise UsageError(str(error))
    return train, dev


def _load_user_files(args, user_files):
    flags = ("--train", "--dev", "--text-column", "--label-column")
    missing = [flag for flag, v in zip(flags, user_files) if v is None]
    if missing:
        raise UsageError(f"your own data needs {', '.join(missing)} as well")
    kind = args.task or config.FILE_TASK_KINDS[0]
    if kind not in config.FILE_TASK_KINDS:
        raise UsageError(
            "with --train/--dev, --task must be "
            f"{' or '.join(config.FILE_TASK_KINDS)}, not {kind!r}"
        )
    try:
        train, dev = loaders.load_files(
            args.train,
            args.dev,
            args.text_column,
            args.label_column,
            text_pair_column=args.text_pair_column,
            kind=kind,
        )
    except ValueError as error:
        raise UsageError(str(error))
    return limit(train, args.train_limit), limit(dev, args.dev_limit)


def limit(data, limit):
    """The first `limit` examples of `data` (all of them for `None`)."""
    if limit is None or data is None or len(data) <= limit:
        return data
    return loaders.subset(data, np.arange(limit))


def resolve_preset(preset):
    try:
        return preprocessing.resolve_preset(preset)
    except ValueError as error:
        raise UsageError(str(error))


def load_evaluation_data(args, saved_spec, columns):
    """The dev data `evaluate` scores: the user's file or a task's split."""
    if args.dev is None and not args.text_column and not args.label_column:
        task = args.task or saved_spec.get("name")
        if task is None or task in config.FILE_TASK_KINDS:
            raise UsageError(
                "the model was trained on your own files: give --dev, "
                "--text-column and --label-column"
            )
        try:
            return loaders.load_task(
                task, "dev", limit=args.dev_limit, data_dir=args.data_dir
            )
        except ValueError as error:
            raise UsageError(str(error))
    if args.dev is None:
        raise UsageError("give --dev with your data")
    text_column = args.text_column or columns.get("text")
    label_column = args.label_column or columns.get("label")
    if not text_column or not label_column:
        raise UsageError("give --text-column and --label-column")
    kind = saved_spec.get("kind", config.FILE_TASK_KINDS[0])
    if kind not in config.FILE_TASK_KINDS:
        raise UsageError(f"the model does {kind}; evaluate it with --task")
    try:
        _, dev = loaders.load_files(
            None,
            args.dev,
            text_column,
            label_column,
            text_pair_column=args.text_pair_column or columns.get("text_pair"),
            kind=kind,
            label_names=saved_spec.get("label_names") or None,
        )
    except ValueError as error:
        raise UsageError(str(error))
    return dev


def check_compatible(model_spec, data_spec):
    """Refuses data whose kind, classes or pairing differ from the model's."""
    if model_spec.kind != data_spec.kind:
        raise UsageError(
            f"the model does {model_spec.kind} but {data_spec.name} is "
            f"{data_spec.kind}"
        )
    if model_spec.label_names != data_spec.label_names:
        raise UsageError(
            f"the labels of {data_spec.name} "
            f"({', '.join(data_spec.label_names)}) are not the model's "
            f"classes ({', '.join(model_spec.label_names)})"
        )
    if model_spec.pair != data_spec.pair:
        raise UsageError(
            f"the model reads {'pairs' if model_spec.pair else 'single'} "
            f"texts but {data_spec.name} has "
            f"{'pairs' if data_spec.pair else 'single texts'}"
        )


def read_model_info(model_path):
    """The `model.json` that `train` wrote next to `model_path`."""
    if not os.path.isfile(model_path):
        raise UsageError(f"{model_path}: no such file")
    info_path = os.path.join(os.path.dirname(model_path), MODEL_INFO_FILE)
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except OSError:
        raise UsageError(
            f"{info_path} is missing: evaluate and predict need the "
            f"{MODEL_INFO_FILE} that `keras-bidora train` writes next to "
            "the model"
        )
    except ValueError as error:
        raise UsageError(f"{info_path} is not valid JSON ({error})")
    if info.get("task", {}).get("kind") == "generation":
        raise UsageError(
            f"{model_path} generates text (task "
            f"{info['task'].get('name')!r}): use `keras-bidora generate "
            f"--model {model_path} PROMPT`"
        )
    return info


def recipe_settings(args):
    """`recipes.finetune`'s settings from the training flags."""
    return dict(
        rank=args.rank,
        alpha=args.alpha,
        targets=args.targets,
        dropout=args.dropout,
        hypergradient=args.hypergradient,
        upper_fraction=args.upper_fraction,
        upper_every=args.upper_every,
        upper_batch_size=args.upper_batch_size,
        direction_regularization=args.direction_regularization,
        epochs=args.epochs,
        retrain_epochs=args.retrain_epochs,
        retrain_init=args.retrain_init,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        upper_learning_rate=args.upper_lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        early_stopping_patience=args.early_stopping_patience,
        early_stopping_fraction=args.early_stopping_fraction,
        early_stopping_min_steps=args.early_stopping_min_steps,
        validation=not args.no_validation,
        verbose=args.verbose,
    )
