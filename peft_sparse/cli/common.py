"""What the ``peft-sparse`` commands share: the usage-error exit code and parser, ``--verbose``, and the limits the
commands check their options against."""

from __future__ import annotations

import argparse

USAGE_ERROR = 2
VERBOSE_HELP = (
    "show what the packages underneath print besides errors (transformers', bitsandbytes', datasets' and "
    "DeepSpeed's logs, deprecation notices, datasets' progress bars)"
)
# AdamW's first step is lr / (1 - beta1) = 10 x lr, and torch refuses (with a traceback) a step that float32, the
# trainable parameters' dtype, cannot hold.
MAX_LR = 3.4028234663852886e38 / 10


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: message``) rather than the usage block too."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")
