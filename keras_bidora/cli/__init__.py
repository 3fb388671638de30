"""The `keras-bidora` command: train, demo, evaluate, predict and generate.

A thin client of the library: `parser` builds the flags from
`keras_bidora.config`, `commands` checks the input, applies `--backend` and
trains with `keras_bidora.recipes.finetune`, and `outputs` writes the
results. Keras is imported only after `--backend` has set `KERAS_BACKEND`
(Keras reads it once, at import), and data, columns, presets and the output
folder are checked before, so that bad input fails fast with one line on
stderr and exit code 2. Training writes into a temporary folder next to
`--out` and renames it at the end, so a failed run leaves nothing behind.
"""

import sys

from keras_bidora.cli import commands
from keras_bidora.cli.parser import PROG
from keras_bidora.cli.parser import UsageError
from keras_bidora.cli.parser import build_parser


def main(argv=None):
    """Runs `keras-bidora`; returns the exit code (2 for bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return commands.COMMANDS[args.command](args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
