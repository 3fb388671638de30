"""The README's Python examples run as written, under each backend."""

import json
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


# Runs each example given on stdin (a JSON list) in a folder of its own,
# in one Python process (importing the backend once, not once an example),
# and writes each one's traceback (None: it ran) to the file argv[1]; the
# folders are made in argv[2].
_DRIVER = """
import json, os, sys, tempfile, traceback
import keras
failures = []
for code in json.load(sys.stdin):
    os.chdir(tempfile.mkdtemp(dir=sys.argv[2]))
    try:
        program = compile(code, "<README example>", "exec")
        exec(program, {"__name__": "__main__"})
        failures.append(None)
    except BaseException:
        failures.append(traceback.format_exc())
    keras.backend.clear_session()
    with open(sys.argv[1], "w") as file:
        json.dump(failures, file)
"""


def run_examples(examples, folder):
    """Each example's traceback, None where it ran, and the process."""
    report = os.path.join(folder, "failures.json")
    # This checkout's keras_bidora, whichever one pip installed.
    path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    env = dict(
        os.environ,
        KERAS_BACKEND=keras.config.backend(),
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=path,
    )
    process = subprocess.run(
        [sys.executable, "-c", _DRIVER, report, folder],
        input=json.dumps(examples),
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    failures = []
    if os.path.exists(report):
        with open(report) as file:
            failures = json.load(file)
    return failures, process


class ReadmeTest(TestCase):
    def test_examples_are_found(self):
        # "Fine-tune a KerasHub task" (classifier, causal LM), the layer,
        # "Adapt a KerasHub model", "Train with BiDoRA", "Fine-tune with
        # the recipe" and "Fine-tune a quantized model".
        self.assertLen(readme_examples(), 7)

    @pytest.mark.large
    def test_examples_run(self):
        examples = readme_examples()
        failures, process = run_examples(examples, self.get_temp_dir())
        self.assertEqual(process.returncode, 0, msg=process.stderr[-4000:])
        self.assertLen(failures, len(examples))
        for code, failure in zip(examples, failures):
            self.assertIsNone(
                failure, msg=f"README example failed:\n{code}\n{failure}"
            )
