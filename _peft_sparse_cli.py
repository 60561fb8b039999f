"""The ``peft-sparse`` command's entry point, and what keeps other packages' chatter out of its output.

It lives outside the ``peft_sparse`` package on purpose: importing anything under ``peft_sparse`` first imports the
package, which imports ``peft`` (to register ``PeftType.SPARSE``), which imports ``bitsandbytes``, which on some
CPUs logs a warning about an optional kernel before a single line of ours has run. Only a module outside the package
can quiet that import. It uses the standard library only.

The command owns its process, so while it runs (unless ``--verbose``) other packages' loggers show errors only,
``DeprecationWarning``/``FutureWarning`` (advice to developers, not about the user's run) are hidden, and datasets'
per-``map`` progress bars are off; the training progress, the tables and ``UserWarning``/``RuntimeWarning`` (ours and
other packages') remain. The library itself (``import peft_sparse``) leaves other packages' loggers alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

# Loggers of the packages underneath (a logger's level covers its children: "transformers.modeling_utils", ...).
# DeepSpeed's logger sets its own level when deepspeed is imported, so each also gets a filter, which that keeps.
THIRD_PARTY_LOGGERS = (
    "bitsandbytes",
    "transformers",
    "datasets",
    "accelerate",
    "DeepSpeed",
    "huggingface_hub",
    "kernels",  # transformers >= 5.25 depends on it; bitsandbytes asks it for a CPU kernel, offline it logs why not
)
# The same settings for worker processes and for packages not yet imported, which read them at import time.
ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
VERBOSE_FLAG = "--verbose"


def wants_verbose(argv: Sequence[str]) -> bool:
    """Whether the command line asks for everything: ``--verbose`` (or ``--verbose=VALUE`` / ``--verbose VALUE``
    with a true value, TRL's boolean form)."""
    for position, token in enumerate(argv):
        if token == "--":
            break
        if token == VERBOSE_FLAG:
            following = argv[position + 1] if position + 1 < len(argv) else ""
            return following.lower() not in {"false", "no", "0"}
        if token.startswith(VERBOSE_FLAG + "="):
            return token.split("=", 1)[1].lower() not in {"false", "no", "0", ""}
    return False


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def only_our_output(verbose: bool = False) -> Iterator[None]:
    """While inside, other packages print only errors (see the module's docstring); everything is as before after.
    With ``verbose`` it changes nothing."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    environment = {name: os.environ.get(name) for name in ENVIRONMENT}
    progress_bars = _datasets_progress_bars()
    bars_were_on = progress_bars is not None and not progress_bars.are_progress_bars_disabled()
    filtered = [logger for logger in loggers if _errors_only not in logger.filters]  # an enclosing call's stay
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    for logger in filtered:
        logger.addFilter(_errors_only)
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if bars_were_on:
        progress_bars.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            for category in DEVELOPER_WARNINGS:
                warnings.filterwarnings("ignore", category=category)
            yield
    finally:
        for logger in filtered:
            logger.removeFilter(_errors_only)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if bars_were_on:
            progress_bars.enable_progress_bars()


def _datasets_progress_bars():
    """datasets' progress-bar switch when datasets is already imported (it reads the variable only on import)."""
    if "datasets" not in sys.modules:
        return None
    from datasets import utils

    return utils


def main(argv: Sequence[str] | None = None) -> int:
    """``peft-sparse ARGV`` (the console script, and ``python -m _peft_sparse_cli`` for worker processes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with only_our_output(wants_verbose(argv)):
        from peft_sparse.cli import main as run_command

        return run_command(argv)


def run_script(argv: Sequence[str] | None = None) -> int:
    """``python -c "...run_script()" SCRIPT ARGS``: run a benchmark script as ``python SCRIPT ARGS`` would, its
    imports included, inside :func:`only_our_output` (``peft-sparse bench`` runs each script so)."""
    import runpy

    argv = list(sys.argv[1:] if argv is None else argv)
    script = os.path.abspath(argv[0])
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(script))  # as `python SCRIPT` puts the script's folder first
    with only_our_output():
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as done:
            code = done.code
            if code is None or isinstance(code, int):
                return code or 0
            print(code, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
