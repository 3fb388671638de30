"""The README's Python examples run as written, under each backend."""

import os
import re
import subprocess
import sys

import keras
import pytest

from tests.test_case import TestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- runs in tests/test_readme.py -->"


def readme_examples():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    pattern = re.escape(MARKER) + r"\s*```python\n(.*?)```"
    return re.findall(pattern, text, flags=re.S)


def run_example(code, cwd):
    env = dict(
        os.environ,
        KERAS_BACKEND=keras.config.backend(),
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


class ReadmeTest(TestCase):
    def test_examples_are_found(self):
        # "Fine-tune a KerasHub task" (classifier, causal LM), the layer,
        # "Adapt a KerasHub model", "Train with BiDoRA", "Fine-tune with
        # the recipe" and "Fine-tune a quantized model".
        self.assertLen(readme_examples(), 7)

    @pytest.mark.large
    def test_examples_run(self):
        for code in readme_examples():
            process = run_example(code, self.get_temp_dir())
            self.assertEqual(
                process.returncode,
                0,
                msg=f"README example failed:\n{code}\n{process.stderr[-4000:]}",
            )
