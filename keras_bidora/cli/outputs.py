"""What the commands write: the staged output folder, metrics.json,
model.json, the demo's table and the plots.

Plots need matplotlib (`pip install keras-bidora[cli]`); without it a run
says so in one line on stderr and writes everything else.
"""

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile

import numpy as np

from keras_bidora.cli.parser import PROG
from keras_bidora.cli.parser import UsageError

MODEL_FILE = "model.keras"
METRICS_FILE = "metrics.json"
PLOT_FILE = "training.png"
DEMO_FILE = "demo.json"
DEMO_PLOT_FILE = "demo.png"


# Output folder ----------------------------------------------------------


def check_out(out, overwrite):
    """Refuses an `--out` that is a file, lies in a missing folder or, unless
    `overwrite`, holds files."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"--out {out} exists and is not a folder")
        if os.listdir(out) and not overwrite:
            raise UsageError(
                f"--out {out} exists and is not empty; pass --overwrite to "
                "replace it"
            )
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError(f"the folder of --out, {parent}, does not exist")


@contextlib.contextmanager
def staged_output(out):
    """Yields a temporary folder next to `out`, renamed to `out` on
    success and removed on failure."""
    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    # mkdtemp makes a private folder; the result gets the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.rmdir(old)
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_demo(out, summary, results, spec):
    """Writes demo.json and demo.png into `out`, each replaced whole;
    returns whether demo.png was drawn."""
    os.makedirs(out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".demo.partial-", dir=out)
    try:
        write_json(os.path.join(staging, DEMO_FILE), summary)
        plot_path = os.path.join(staging, DEMO_PLOT_FILE)
        drawn = draw(plot_demo, plot_path, results, spec)
        for name in (DEMO_FILE, DEMO_PLOT_FILE) if drawn else (DEMO_FILE,):
            os.replace(os.path.join(staging, name), os.path.join(out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return drawn


# JSON -------------------------------------------------------------------


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=_json_default)
        f.write("\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def json_arguments(args):
    """The command line's arguments, as given (`None` where defaulted to
    another setting, e.g. `alpha`)."""
    return {k: v for k, v in vars(args).items() if k not in ("func",)}


def versions(keras):
    """The versions of Python, the packages and the backend of this run."""
    import keras_hub

    import keras_bidora

    backend = keras.config.backend()
    return {
        "python": platform.python_version(),
        "keras_bidora": keras_bidora.__version__,
        "keras": keras.__version__,
        "keras_hub": keras_hub.__version__,
        "numpy": np.__version__,
        "backend": backend,
        backend: sys.modules[backend].__version__,
    }


def model_info(args, spec, preset, sequence_length, method, input_names):
    """model.json: what `evaluate` and `predict` need to read the model."""
    info = {
        "format": "keras-bidora/1",
        "task": spec.to_config(),
        "method": method,
        "preset": preset,
        "sequence_length": sequence_length,
        "input_names": sorted(input_names),
    }
    if getattr(args, "train", None):
        info["columns"] = {
            "text": args.text_column,
            "text_pair": args.text_pair_column,
            "label": args.label_column,
        }
    return info


# Text -------------------------------------------------------------------


def result_line(result):
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result["dev"].items())
    return (
        f"[{result['method']}] dev: {scores} | trainable params "
        f"{result['parameters']['trainable']:,} | train time "
        f"{result['wall_time_s']['train']:.1f}s"
    )


def demo_table(results, spec):
    """The demo's table: dev metrics, trainable parameters and train time
    per method."""
    metrics = list(spec.metrics)
    header = (
        ["method"]
        + [f"dev {m}" for m in metrics]
        + ["trainable params", "train time (s)"]
    )
    rows = [
        [r["method"]]
        + [f"{r['dev'][m]:.4f}" for m in metrics]
        + [
            f"{r['parameters']['trainable']:,}",
            f"{r['wall_time_s']['train']:.0f}",
        ]
        for r in results
    ]
    widths = [
        max(len(str(row[i])) for row in [header] + rows)
        for i in range(len(header))
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return "\n".join(lines)


# Plots ------------------------------------------------------------------


def draw(plot, path, *args):
    """Draws `plot(plt, *args, path)`; without matplotlib, says so on
    stderr and returns False, so that the run keeps its other outputs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            f"{PROG}: matplotlib is not installed, so "
            f"{os.path.basename(path)} was not drawn; pip install "
            "keras-bidora[cli] to get plots",
            file=sys.stderr,
        )
        return False
    plot(plt, *args, path)
    return True


def smooth(values, window):
    """A running mean over `window` values, the first value padding the
    start."""
    values = np.asarray(values, dtype="float64")
    if values.size < 2 or window < 2:
        return values
    window = min(window, values.size)
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


_LOSS_LABELS = {
    "loss": "train loss",
    "val_loss": "dev loss",
    "upper_loss": "upper-level loss (magnitudes)",
}


def plot_run(plt, result, spec, path):
    """training.png: the loss per step and per epoch, phase by phase."""
    figure, (steps_axis, epochs_axis) = plt.subplots(1, 2, figsize=(11, 4))
    offset = epoch_offset = 0
    curves = {}
    for index, (phase, losses) in enumerate(result["batch_loss"].items()):
        steps = np.arange(offset, offset + len(losses)) + 1
        if losses:
            color = f"C{index}"
            steps_axis.plot(steps, losses, alpha=0.25, color=color)
            steps_axis.plot(steps, smooth(losses, 10), color=color, label=phase)
        if offset:
            steps_axis.axvline(offset + 0.5, color="gray", linestyle=":")
            epochs_axis.axvline(epoch_offset + 0.5, color="gray", linestyle=":")
        offset += len(losses)
        history = result["epochs"][phase]
        _epoch_curves(curves, phase, history, epoch_offset)
        epoch_offset += len(next(iter(history.values()), []))
    for key, points in curves.items():
        epochs, values = zip(*points)
        epochs_axis.plot(epochs, values, marker="o", label=_LOSS_LABELS[key])
    steps_axis.set_xlabel("step")
    steps_axis.set_ylabel("training loss per batch (light) and smoothed")
    steps_axis.legend()
    epochs_axis.set_xlabel("epoch (dotted line: next phase)")
    epochs_axis.set_ylabel("mean loss over the epoch")
    epochs_axis.xaxis.get_major_locator().set_params(integer=True)
    epochs_axis.legend()
    scores = ", ".join(f"{k} {v:.3f}" for k, v in result["dev"].items())
    figure.suptitle(f"{spec.name}, {result['method']}: dev {scores}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _epoch_curves(curves, phase, history, epoch_offset):
    for key, values in history.items():
        # Only the bi-level phase has an upper level.
        if key in _LOSS_LABELS and (key != "upper_loss" or phase == "bilevel"):
            for epoch, value in enumerate(values, start=epoch_offset + 1):
                curves.setdefault(key, []).append((epoch, value))


def plot_demo(plt, results, spec, path):
    """demo.png: each method's smoothed loss, and its dev metric."""
    figure, (steps_axis, bars_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for index, result in enumerate(results):
        phases = list(result["batch_loss"].values())
        losses = [v for phase in phases for v in phase]
        steps_axis.plot(
            np.arange(1, len(losses) + 1),
            smooth(losses, 10),
            color=f"C{index}",
            label=result["method"],
        )
        boundary = 0
        for phase in phases[:-1]:
            boundary += len(phase)
            steps_axis.axvline(boundary + 0.5, color=f"C{index}", linestyle=":")
    steps_axis.set_xlabel("step (dotted: bidora's retrain phase starts)")
    steps_axis.set_ylabel("training loss per batch (smoothed)")
    steps_axis.legend()
    metric = spec.main_metric
    names = [r["method"] for r in results]
    values = [r["dev"][metric] for r in results]
    bars = bars_axis.bar(
        names, values, color=[f"C{i}" for i in range(len(results))]
    )
    for bar, value in zip(bars, values):
        bars_axis.annotate(
            f"{value:.3f}",
            (bar.get_x() + bar.get_width() / 2, value),
            ha="center",
            va="bottom",
        )
    bars_axis.set_ylabel(f"dev {metric}")
    bars_axis.set_ylim(0, 1.05 if max(values) <= 1 else None)
    figure.suptitle(f"LoRA vs DoRA vs BiDoRA on {spec.name}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
