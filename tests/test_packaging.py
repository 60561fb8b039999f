"""A wheel that works anywhere: the build ships the C++/CUDA sources inside the package, the backends find them
there before a checkout's ``csrc/``, and the CPU sources build on a non-x86 target.

Building and installing a whole wheel (and JIT-building its shipped sources) is .ci/run's "wheel" step; these are
the parts that take seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from peft_sparse.ops import _backend

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _tracked_sources() -> list[str]:
    """The files under csrc/ that the working tree holds, not git-ignored ones (all of csrc/ where this is no git
    checkout)."""
    if shutil.which("git") is not None and (ROOT / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "csrc"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return sorted(str(Path(line).relative_to("csrc")) for line in listed.stdout.splitlines())
    return sorted(str(path.relative_to(CSRC)) for path in CSRC.rglob("*") if path.is_file())


def test_sdist_and_wheel_take_every_source(tmp_path):
    """MANIFEST.in puts every file of csrc/ into the sdist (from which pip builds wheels), and setup.py's build_py
    copies each of them into the built package as peft_sparse/_csrc/, and nothing into the checkout."""
    env = dict(os.environ, PEFT_SPARSE_BUILD_EXTENSION="0")  # build_py only: no compiler, no torch import
    result = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "egg_info",
            "--egg-base",
            str(tmp_path),
            "build_py",
            "--build-lib",
            str(tmp_path / "lib"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tracked = _tracked_sources()
    sdist = set((tmp_path / "peft_sparse.egg-info" / "SOURCES.txt").read_text().splitlines())
    assert [name for name in tracked if f"csrc/{name}" not in sdist] == [], "missing from the sdist (MANIFEST.in)"
    shipped_root = tmp_path / "lib" / "peft_sparse" / "_csrc"
    shipped = sorted(str(path.relative_to(shipped_root)) for path in shipped_root.rglob("*") if path.is_file())
    assert shipped == tracked
    for name in shipped:
        assert (shipped_root / name).read_bytes() == (CSRC / name).read_bytes(), name
    assert not (ROOT / "peft_sparse" / "_csrc").exists(), "the build wrote its copy into the checkout"


def _load_backend_copy(package_dir: Path):
    """peft_sparse/ops/_backend.py, copied into `package_dir` and loaded from there."""
    target = package_dir / "ops" / "_backend.py"
    target.parent.mkdir(parents=True)
    shutil.copy(Path(_backend.__file__), target)
    spec = importlib.util.spec_from_file_location("backend_copy", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sources_dir_prefers_the_shipped_copy(tmp_path):
    installed = tmp_path / "site-packages" / "peft_sparse"
    (installed / "_csrc").mkdir(parents=True)
    assert _load_backend_copy(installed).CSRC == (installed / "_csrc").resolve()


def test_sources_dir_falls_back_to_the_checkout(tmp_path):
    checkout = tmp_path / "clone"
    assert _load_backend_copy(checkout / "peft_sparse").CSRC == (checkout / "csrc").resolve()


def test_this_checkout_uses_its_csrc():
    """Tests run on an editable install (or a plain checkout), which ships no copy: the sources under test are
    the ones the backends compile."""
    assert _backend.CSRC == CSRC


@pytest.mark.slow
def test_cpu_sources_build_for_aarch64(tmp_path):
    """The CPU kernels compile for a non-x86 target (the AVX2 function clones are x86-only). Code generation, not
    only -fsyntax-only: GCC rejects a target("avx2") clone only when it emits code."""
    compiler = shutil.which("aarch64-linux-gnu-g++")
    if compiler is None:
        pytest.skip("no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
    from torch.utils import cpp_extension

    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    sources = ("ops.cpp", "cpu/ops_cpu.cpp")
    compiles = [  # both at once
        subprocess.Popen(
            [
                compiler,
                "-c",
                "-O0",
                "-std=c++20",
                "-fopenmp",
                *includes,
                f"-I{sysconfig.get_paths()['include']}",
                "-DTORCH_EXTENSION_NAME=_C",
                str(CSRC / source),
                "-o",
                str(tmp_path / f"{Path(source).stem}.o"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for source in sources
    ]
    for source, process in zip(sources, compiles, strict=True):
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"{source}:\n{stderr[-4000:]}"


def _setup_namespace() -> dict:
    """setup.py's module-level constants and functions, without running ``setup()`` (its last statement)."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    keep = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.Assign))]
    namespace: dict = {"__file__": str(ROOT / "setup.py")}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), namespace)  # noqa: S102
    return namespace


def test_a_cuda_build_without_a_visible_gpu_gets_a_documented_architecture_list():
    setup = _setup_namespace()
    default = setup["DEFAULT_CUDA_ARCH_LIST"]
    # a Docker build or CI runner: CUDA torch and nvcc, no GPU, no TORCH_CUDA_ARCH_LIST (torch's own default raised
    # IndexError there)
    assert setup["cuda_arch_list"]({}, visible_gpus=0) == default
    assert setup["cuda_arch_list"]({"TORCH_CUDA_ARCH_LIST": "  "}, visible_gpus=0) == default
    # the user's choice, or the visible GPUs, decide otherwise
    assert setup["cuda_arch_list"]({"TORCH_CUDA_ARCH_LIST": "9.0"}, visible_gpus=0) is None
    assert setup["cuda_arch_list"]({}, visible_gpus=1) is None
    archs = [arch.removesuffix("+PTX") for arch in default.split(";")]
    assert all(float(arch) >= 7.5 for arch in archs) and default.endswith("+PTX")  # CUDA 13 dropped sm < 75
    assert "DEFAULT_CUDA_ARCH_LIST" in (ROOT / "docs" / "development.md").read_text()
