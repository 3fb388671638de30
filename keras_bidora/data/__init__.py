"""Task data: the shipped GLUE, CoNLL-2003 and E2E NLG subsets, users'
files, and their tokenization with KerasHub. See `files/README.md` for
provenance."""

from keras_bidora.data.loaders import FILES_DIR
from keras_bidora.data.loaders import TaskData
from keras_bidora.data.loaders import iob1_to_iob2
from keras_bidora.data.loaders import load_e2e
from keras_bidora.data.loaders import load_files
from keras_bidora.data.loaders import load_task
from keras_bidora.data.loaders import read_conll
from keras_bidora.data.loaders import read_table
from keras_bidora.data.preprocessing import IGNORE
from keras_bidora.data.preprocessing import Encoder
from keras_bidora.data.preprocessing import build_model
from keras_bidora.data.preprocessing import default_preset
from keras_bidora.data.preprocessing import initial_output_bias
from keras_bidora.data.preprocessing import resolve_preset
from keras_bidora.data.task_spec import TASKS
from keras_bidora.data.task_spec import TaskSpec
from keras_bidora.data.task_spec import get_task_spec

__all__ = [
    "FILES_DIR",
    "IGNORE",
    "TASKS",
    "Encoder",
    "TaskData",
    "TaskSpec",
    "build_model",
    "default_preset",
    "get_task_spec",
    "initial_output_bias",
    "iob1_to_iob2",
    "load_e2e",
    "load_files",
    "load_task",
    "read_conll",
    "read_table",
    "resolve_preset",
]
