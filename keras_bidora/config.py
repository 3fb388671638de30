"""Every default and every choice of keras-bidora, declared once.

This module imports nothing from Keras, so the command line can read it (to
build its flags and their help) before `--backend` has chosen a backend.
The layer, `inject`, `BiDoRAModel`, `recipes.finetune`, the command line
and the benchmarks all take their defaults from here.
"""

# Backends ---------------------------------------------------------------

BACKENDS = ("jax", "tensorflow", "torch")

# Adapters ---------------------------------------------------------------

RANK = 8
# `alpha=None` means `ALPHA_PER_RANK * rank`, a scale `s = alpha / rank` of
# 2 at every rank: the DoRA paper's released scripts set `lora_alpha = 2 *
# lora_r` (r=32, alpha=64 for LLaMA commonsense reasoning), and it is what
# every run in benchmarks/ used (rank 8, alpha 16). PEFT's own default,
# alpha = 8 whatever the rank, shrinks the update as the rank grows.
ALPHA_PER_RANK = 2
DROPOUT = 0.0
DETACH_NORM = False
LORA_A_INITIALIZER = "he_uniform"

# The Keras quantization modes (`layer.quantize(mode)`) of a base kernel
# that BiDoRADense adapts: it dequantizes W0 inside its call. float8, gptq
# and awq keep other state (scaling histories, calibrated kernels) that it
# does not read.
QUANTIZATION_MODES = ("int8", "int4")


def default_alpha(rank):
    """The scale numerator used when `alpha=None`: `ALPHA_PER_RANK * rank`."""
    return ALPHA_PER_RANK * rank


# The bi-level optimisation ----------------------------------------------

# What `BiDoRAModel(method=...)` trains: magnitudes and direction jointly
# on all the data ("dora"), or at two levels ("bidora").
MODEL_METHODS = ("dora", "bidora")
# What `recipes.finetune(method=...)` trains: the two above, LoRA on the
# same matrix view (`BiDoRADense(magnitude=False)`) and KerasHub's own
# `enable_lora` (per-head factors).
METHODS = ("lora", "keras-lora") + MODEL_METHODS
# The methods the demo and the accuracy benchmarks compare.
COMPARED_METHODS = ("lora", "dora", "bidora")
METHOD = "bidora"

HYPERGRADIENTS = ("first_order", "darts", "darts_forward", "neumann")
# As accurate as "darts" in benchmarks/README.md's runs, at 2 passes per
# step instead of 4.
HYPERGRADIENT = "first_order"
UPPER_FRACTION = 0.2
UPPER_EVERY = 1
# The upper batch size: None is the lower batch size (`fit`'s `batch_size`,
# or a dataset's first batch's). `UPPER_BATCH_SIZE_PROPORTIONAL` sizes the
# upper batches to the upper split (`proportional_upper_batch_size`), so
# that `upper_every=1` reads each split about once per epoch instead of the
# upper one `(1 - upper_fraction) / upper_fraction` times. It stays an
# option until an accuracy study finds it as accurate as full batches.
UPPER_BATCH_SIZE = None
UPPER_BATCH_SIZE_PROPORTIONAL = "proportional"
# The paper's orthogonality penalty coefficient (it uses 1e-5 or 0).
DIRECTION_REGULARIZATION = 1e-5
NEUMANN_TERMS = 3
# Seeds the lower/upper split and the per-epoch shuffles.
SEED = 0


def proportional_upper_batch_size(batch_size, upper_fraction):
    """The upper batch size in the ratio of the two splits' sizes.

    `max(1, round(batch_size * upper_fraction / (1 - upper_fraction)))`:
    as many upper batches as lower ones make one pass over each split.

    Example:

    >>> proportional_upper_batch_size(32, 0.2)
    8
    """
    ratio = upper_fraction / (1 - upper_fraction)
    return max(1, round(batch_size * ratio))


# The fine-tuning recipe -------------------------------------------------

EPOCHS = 2
RETRAIN_EPOCHS = 1
# Where the retrain phase starts: the direction the bi-level phase learned,
# or a fresh one (as BiDoRA's official code).
RETRAIN_INITS = ("continue", "reinitialize")
RETRAIN_INIT = "continue"
# Also what `BiDoRAModel.fit` uses when given none, as `keras.Model.fit`.
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.0
# Tokens per example: enough for about 95% of the shipped examples
# untruncated (SST-2 and CoLA are short).
SEQUENCE_LENGTHS = {"sst2": 64, "cola": 64}
SEQUENCE_LENGTH = 128
EVALUATION_BATCH_SIZE = 64
# How a classification or regression head reads the backbone: its pooled
# output (KerasHub's `TextClassifier`: the first token, through BERT's
# pooler) or the mean of its sequence output over the padding mask, the
# pooling sentence-transformers models such as MiniLM-L6 were trained with.
POOLINGS = ("cls", "mean")
POOLING = "cls"
# Early stopping (`recipes.finetune(early_stopping_patience=N)`): the share
# of the training data held out to watch, never the dev data.
EARLY_STOPPING_FRACTION = 0.1
# ...and the training steps of a phase before it may stop
# (`early_stopping_min_steps`): none by default.
EARLY_STOPPING_MIN_STEPS = 0


def sequence_length(task):
    """The default tokens per example of a built-in task (or any other)."""
    return SEQUENCE_LENGTHS.get(task, SEQUENCE_LENGTH)


# The demo: about 10 minutes on 2 CPU cores -------------------------------

DEMO_TASK = "sst2"
DEMO_TRAIN_LIMIT = 1000
DEMO_SEQUENCE_LENGTH = 48
DEMO_LEARNING_RATE = 2e-3


# The command line -------------------------------------------------------

# What `--task` means with your own `--train`/`--dev` files.
FILE_TASK_KINDS = ("classification", "regression")
# Built-in text generation tasks: a KerasHub `CausalLM` preset learns to
# write the response to each prompt (`keras_bidora.data.load_e2e`).
GENERATION_TASKS = ("e2e",)
# What separates the two texts of a pair in `keras-bidora predict`.
PAIR_SEPARATOR = "|||"
# The environment variable naming JAX's persistent compilation cache for the
# command line (the flag `--jax-compilation-cache` wins over it).
JAX_CACHE_ENV = "KERAS_BIDORA_JAX_CACHE"
DEMO_OUT = "keras-bidora-demo"
