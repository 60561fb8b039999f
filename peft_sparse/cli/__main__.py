"""``python -m peft_sparse.cli``: the console script's entry point (which quiets other packages' output)."""

import sys

from _peft_sparse_cli import main

sys.exit(main())
