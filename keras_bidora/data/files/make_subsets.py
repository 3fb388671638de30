"""Makes the shipped subsets from the full files (run once; kept as record).

Usage: python make_subsets.py /path/to/shared/data

Every subset keeps the original file's format and bytes: whole lines are
copied, nothing is re-encoded, re-quoted or re-ordered. README.md beside
this script says which lines each file holds.
"""

import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# (source, target, header lines, how data rows are picked)
GLUE = [
    ("glue/SST-2/train.tsv", "glue/SST-2/train.tsv", 1, ("first", 2000)),
    ("glue/SST-2/dev.tsv", "glue/SST-2/dev.tsv", 1, ("all",)),
    ("glue/RTE/train.tsv", "glue/RTE/train.tsv", 1, ("first", 1000)),
    ("glue/RTE/dev.tsv", "glue/RTE/dev.tsv", 1, ("all",)),
    ("glue/MRPC/train.tsv", "glue/MRPC/train.tsv", 1, ("first", 1000)),
    ("glue/MRPC/dev.tsv", "glue/MRPC/dev.tsv", 1, ("all",)),
    # CoLA and STS-B train files are sorted by source, so a prefix would
    # hold one source only; every k-th row keeps all of them.
    ("glue/CoLA/train.tsv", "glue/CoLA/train.tsv", 0, ("every", 4)),
    ("glue/CoLA/dev.tsv", "glue/CoLA/dev.tsv", 0, ("all",)),
    ("glue/STS-B/train.tsv", "glue/STS-B/train.tsv", 1, ("every", 3)),
    ("glue/STS-B/dev.tsv", "glue/STS-B/dev.tsv", 1, ("all",)),
]
# E2E NLG (meaning representation, reference): the CLI's e2e task and the
# causal LM example. Its rows are one line each (checked by the script).
E2E = [
    ("e2e_nlg/trainset.csv", "e2e_nlg/trainset.csv", 1, ("first", 400)),
    ("e2e_nlg/devset.csv", "e2e_nlg/devset.csv", 1, ("first", 100)),
]
# (source, target, number of leading documents)
CONLL = [
    ("conll2003/eng.train", "conll2003/eng.train", 40),
    ("conll2003/eng.testa", "conll2003/eng.testa", 20),
]


def _write(target, text):
    path = os.path.join(HERE, target)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    data = text.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()[:16]
    print(f"{target}\t{len(data)} bytes\tsha256 {digest}")


def make_glue(root, source, target, header, pick):
    with open(os.path.join(root, source), encoding="utf-8", newline="") as f:
        lines = f.read().splitlines(keepends=True)
    head, rows = lines[:header], lines[header:]
    if pick[0] == "first":
        rows = rows[: pick[1]]
    elif pick[0] == "every":
        rows = rows[:: pick[1]]
    # The last line of some originals has no newline; a subset that ends
    # elsewhere gets one so that the file is well formed.
    if rows and not rows[-1].endswith("\n") and pick[0] != "all":
        rows[-1] += "\n"
    print(f"  {len(rows)} data rows", end="  ")
    _write(target, "".join(head + rows))


def _check_one_line_rows(target, rows):
    import csv

    with open(os.path.join(HERE, target), encoding="utf-8", newline="") as f:
        parsed = list(csv.reader(f))
    if len(parsed) != rows + 1:
        raise SystemExit(f"{target}: a row spans several lines")


def make_conll(root, source, target, documents):
    with open(os.path.join(root, source), encoding="utf-8", newline="") as f:
        lines = f.read().splitlines(keepends=True)
    starts = [
        i for i, line in enumerate(lines) if line.startswith("-DOCSTART-")
    ]
    end = starts[documents] if documents < len(starts) else len(lines)
    kept = lines[:end]
    sentences = sum(
        1
        for i, line in enumerate(kept)
        if line.strip()
        and not line.startswith("-DOCSTART-")
        and (i == 0 or not kept[i - 1].strip())
    )
    print(f"  {documents} documents, {sentences} sentences", end="  ")
    _write(target, "".join(kept))


if __name__ == "__main__":
    root = sys.argv[1]
    for source, target, header, pick in GLUE:
        make_glue(root, source, target, header, pick)
    for source, target, header, pick in E2E:
        make_glue(root, source, target, header, pick)
        _check_one_line_rows(target, pick[1])
    for source, target, documents in CONLL:
        make_conll(root, source, target, documents)
