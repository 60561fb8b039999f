"""The command prints its own output: other packages' logs and deprecation notices are held back unless --verbose,
while errors, ``UserWarning``/``RuntimeWarning`` and our own logs still get through, and nothing is changed after."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from _peft_sparse_cli import THIRD_PARTY_LOGGERS, only_our_output, wants_verbose


class Recorder(logging.Handler):
    """Attached to the logger a message is logged on, it sees what that logger lets through (level and filters),
    wherever the package's own handlers would have written it."""

    def __init__(self, seen: list[str]):
        super().__init__(logging.NOTSET)
        self.seen = seen

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


@pytest.fixture(autouse=True)
def loggers_at_their_defaults():
    """Third-party loggers at WARNING, as in a fresh process (other tests' commands may have quieted transformers)."""
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def emit_everything(caught: list[warnings.WarningMessage]) -> str:
    """What the packages underneath print during a run, as they print it; what got through (logged, and warned
    into ``caught``), as one text."""
    seen: list[str] = []
    logs = [
        ("bitsandbytes.backends.cpu.ops", logging.WARNING, "bnb: optional kernel missing"),
        ("transformers.modeling_utils", logging.WARNING, "transformers: weights not initialised"),
        ("DeepSpeed", logging.WARNING, "deepspeed: setting accelerator to CPU"),
        ("kernels._internals.hf_hub", logging.WARNING, "kernels: skipping publisher trust check"),
        ("bitsandbytes", logging.ERROR, "bnb: a real error"),
        ("peft_sparse.training", logging.WARNING, "ours: a layer got no gradient"),
    ]
    del caught[:]
    for name, level, message in logs:
        logger = logging.getLogger(name)
        recorder = Recorder(seen)
        logger.addHandler(recorder)
        # DeepSpeed's logger sets its own level when deepspeed is imported, which happens inside the command
        own_level = logger.level
        if name == "DeepSpeed":
            logger.setLevel(logging.WARNING)
        try:
            logger.log(level, message)
        finally:
            logger.removeHandler(recorder)
            logger.setLevel(own_level)
    warnings.warn("transformers: is_gradient_checkpointing is deprecated", FutureWarning, stacklevel=1)
    warnings.warn("torch: an old API", DeprecationWarning, stacklevel=1)
    warnings.warn("about your run: the learning rate looks huge", RuntimeWarning, stacklevel=1)
    return "\n".join([*seen, *(f"{w.category.__name__}: {w.message}" for w in caught)])


def test_only_errors_warnings_about_the_run_and_our_logs_get_through():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with only_our_output():
            shown = emit_everything(caught)
    for message in ("bnb: a real error", "ours: a layer got no gradient", "the learning rate looks huge"):
        assert message in shown
    for message in ("optional kernel", "weights not initialised", "accelerator to CPU", "trust check", "deprecated"):
        assert message not in shown, shown
    assert "old API" not in shown


def test_verbose_shows_everything_and_nothing_stays_changed_after():
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    before = [(logger.level, list(logger.filters)) for logger in loggers]
    environment = dict(os.environ)
    with only_our_output(), only_our_output():  # nested, as the console script and the command both enter it
        pass
    assert [(logger.level, list(logger.filters)) for logger in loggers] == before
    assert dict(os.environ) == environment
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        everything = emit_everything(caught)
        with only_our_output(verbose=True):
            assert emit_everything(caught) == everything
    for message in ("optional kernel", "weights not initialised", "accelerator to CPU", "trust check", "deprecated"):
        assert message in everything, everything


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["finetune"], False),
        (["finetune", "--verbose"], True),
        (["sft", "--verbose", "--max_steps", "3"], True),
        (["sft", "--verbose", "false"], False),
        (["sft", "--verbose=True"], True),
        (["sft", "--verbose=no"], False),
        (["sft", "--", "--verbose"], False),
    ],
)
def test_wants_verbose_reads_the_flag_in_argparse_and_trl_forms(argv, verbose):
    assert wants_verbose(argv) is verbose


@pytest.mark.parametrize(
    ("argv", "stderr"),
    [
        (["--help"], ""),
        (["sft", "--help"], ""),
        (["finetune", "--steps", "0"], "peft-sparse finetune: error: --steps must be >= 1, got 0\n"),
    ],
)
def test_the_command_prints_nothing_but_its_own_output(argv, stderr):
    # (a fresh process: on CPUs with AVX512-BF16, importing bitsandbytes logs a warning about an optional kernel)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "_peft_sparse_cli", *argv], capture_output=True, text=True, env=env, check=False
    )
    assert result.stderr == stderr
    assert result.returncode == (0 if argv[-1] == "--help" else 2)


def test_bench_scripts_run_as_python_would_run_them_with_only_their_own_output(tmp_path):
    (tmp_path / "helper.py").write_text("VALUE = 'from a sibling module'\n")
    script = tmp_path / "bench_script.py"
    script.write_text(
        "import logging, sys\nfrom helper import VALUE\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('noise from an import')\n"
        "print(VALUE, sys.argv[1:], __name__, __file__.endswith('bench_script.py'))\nsys.exit(int(sys.argv[1]))\n"
    )
    launcher = "import sys, _peft_sparse_cli; sys.exit(_peft_sparse_cli.run_script())"
    for code in ("0", "3"):
        result = subprocess.run(
            [sys.executable, "-c", launcher, str(script), code], capture_output=True, text=True, check=False
        )
        assert (result.returncode, result.stderr) == (int(code), "")
        assert result.stdout == f"from a sibling module ['{code}'] __main__ True\n"
