"""`python -m keras_bidora`: the `keras-bidora` command."""

import sys

from keras_bidora.cli import main

sys.exit(main())
