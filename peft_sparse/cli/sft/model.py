"""``peft-sparse sft``'s model and adapters: the causal LM (optionally 4-bit or 8-bit), the sparse adapter's
:class:`~peft_sparse.SparseConfig` at LoRA rank ``--lora_r``'s count, and the LoRA baseline's config."""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import models
from .arguments import CONFIG_FIELDS, SftError, _one_line, target_modules


def resolve_model(model_args) -> models.ModelSource:
    try:
        return models.resolve(model_args.model_name_or_path, option="--model_name_or_path")
    except models.ModelNotFound as err:
        raise SftError(str(err)) from None


def load_model(source: models.ModelSource, model_args):
    """The causal LM in ``--dtype``. With ``--load_in_4bit`` every linear layer but the head is a bitsandbytes 4-bit
    layer (TRL's ``get_quantization_config``: NF4, double quantisation by default here), computing in float32 on a
    CPU (its kernels' dtype) and in ``--dtype`` elsewhere, QLoRA-style; ``--load_in_8bit``: bitsandbytes int8."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    cuda = torch.cuda.is_available()
    source = models.as_folder(source)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    kwargs: dict[str, Any] = {
        "local_files_only": True,
        "attn_implementation": model_args.attn_implementation,
        "dtype": dtype,
    }
    if model_args.load_in_4bit or model_args.load_in_8bit:
        compute = model_args if cuda else dataclasses.replace(model_args, dtype="float32")
        kwargs["quantization_config"] = get_quantization_config(compute)
        kwargs["device_map"] = {"": torch.cuda.current_device() if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    if model_args.load_in_4bit and not cuda:
        _keep_4bit_weight_layout(model)
    return model


def quantization(model_args) -> str:
    """How the base is quantised, in words ('' when it is not)."""
    if model_args.load_in_4bit:
        return f"4-bit {model_args.bnb_4bit_quant_type.upper()}" + (
            ", double quantisation" if model_args.use_bnb_nested_quant else ""
        )
    return "8-bit" if model_args.load_in_8bit else ""


def _keep_4bit_weight_layout(model) -> None:
    """On AVX512-BF16 CPUs, bitsandbytes' 4-bit forward in eval mode without grad (an evaluation, a generation)
    repacks the weight in place for a bf16 inference kernel, lossily, and leaves it so: later training forwards run
    that kernel, which has no backward (bitsandbytes 0.50; torch warns "an autograd kernel was not registered"), so
    QLoRA's gradients through the base layers go silently wrong after the first evaluation. Keep every 4-bit layer
    on the standard layout and path (the sparse adapter's layers decode the weight themselves anyway)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def sparse_config(base, model_args, sparse_args, seed: int):
    """The :class:`~peft_sparse.SparseConfig`: LoRA rank ``--lora_r``'s count on LoRA's layers unless
    ``--density``/``--num_tunable_weights`` is given; with ``--sparse_r``, that count less the low-rank term's."""
    import peft_sparse

    targets = sparse_args.sparse_target_modules
    if sparse_args.density is not None:
        budget: dict[str, Any] = {"density": sparse_args.density}
    elif sparse_args.num_tunable_weights is not None:
        budget = {"num_tunable_weights": sparse_args.num_tunable_weights}
    else:
        count = _lora_count(
            base,
            model_args.lora_r,
            lora_targets(model_args, sparse_args),
            "--lora_target_modules" if model_args.lora_target_modules else "--sparse_target_modules",
        )
        if sparse_args.sparse_r > 0:
            low_rank = _lora_count(base, sparse_args.sparse_r, targets, "--sparse_target_modules")
            if low_rank >= count:
                raise SftError(
                    f"--sparse_r {sparse_args.sparse_r}: its low-rank term alone has {low_rank:,} "
                    f"parameters, not fewer than LoRA rank --lora_r {model_args.lora_r}'s {count:,}; "
                    "use a smaller --sparse_r"
                )
            count -= low_rank
        budget = {"num_tunable_weights": count}
    try:
        return peft_sparse.SparseConfig(
            task_type="CAUSAL_LM",
            target_modules=targets,
            seed=seed,
            **{
                name: getattr(sparse_args, option)
                for option, name in CONFIG_FIELDS.items()
                if option not in ("density", "num_tunable_weights")  # the budget, above
            },
            **budget,
        )
    except (TypeError, ValueError) as err:
        raise SftError(_one_line(err)) from None


def _lora_count(base, r: int, targets, option: str) -> int:
    import peft_sparse

    try:
        return peft_sparse.lora_equivalent_budget(base, r=r, target_modules=targets, task_type="CAUSAL_LM")
    except ValueError:
        raise SftError(f"{option} {targets!r} matched no linear layer of the model") from None


def lora_targets(model_args, sparse_args) -> str | list[str]:
    """LoRA's layers: ``--lora_target_modules``, by default the sparse adapter's (``--sparse_target_modules``)."""
    if model_args.lora_target_modules:
        return target_modules(model_args.lora_target_modules)
    return sparse_args.sparse_target_modules


def lora_config(model_args, sparse_args):
    """TRL's ``get_peft_config`` (rank ``--lora_r``, ``--lora_alpha``, ``--lora_dropout``, ``--use_rslora``, ...) on
    :func:`lora_targets`."""
    from trl import get_peft_config

    config = get_peft_config(dataclasses.replace(model_args, use_peft=True))
    return dataclasses.replace(config, target_modules=lora_targets(model_args, sparse_args))
