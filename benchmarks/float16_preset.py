"""Copies a Hugging Face-format preset with its weights rounded to float16.

Used to take the default model (91 MB of float32 weights) to a machine
that only receives 64 MiB: the copy's float32 tensors are stored as
float16 (45 MB), other tensors unchanged, the other files copied (the
README and the sentence-transformers data card are left out). KerasHub
loads the copy as usual and its variables stay float32, holding the
rounded values. On the MiniLM-L6 default, the copy's sequence outputs
differ from the original's by at most 0.005 (mean 2e-4, on outputs of mean
magnitude 0.21) over 64 RTE dev pairs; `benchmarks/README.md` says which
results used such a copy.

Usage:

    python benchmarks/float16_preset.py DESTINATION [--preset SOURCE]
"""

import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

WEIGHTS = "model.safetensors"
SKIPPED = ("README.md", "data_config.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("destination", help="a new folder")
    parser.add_argument(
        "--preset", help="source folder (default: the offline MiniLM-L6)"
    )
    args = parser.parse_args(argv)
    import numpy as np
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    from keras_bidora.data import preprocessing

    source = args.preset or preprocessing.default_preset()
    if not os.path.isfile(os.path.join(source, WEIGHTS)):
        parser.error(f"{source} has no {WEIGHTS}. Received: --preset {source}")
    if os.path.exists(args.destination):
        parser.error(f"{args.destination} exists; give a new folder")
    partial = args.destination + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for name in os.listdir(source):
        path = os.path.join(source, name)
        if os.path.isfile(path) and name not in (WEIGHTS, *SKIPPED):
            shutil.copy(path, partial)
    weights = load_file(os.path.join(source, WEIGHTS))
    rounded = {
        key: value.astype("float16") if value.dtype == np.float32 else value
        for key, value in weights.items()
    }
    save_file(rounded, os.path.join(partial, WEIGHTS), {"format": "pt"})
    os.replace(partial, args.destination)
    print(f"Wrote {args.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
