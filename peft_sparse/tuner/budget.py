"""How many trainable entries each targeted layer gets, and the LoRA-equivalent budget for fair comparisons."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["allocate_budget", "lora_equivalent_budget", "targeted_linear_shapes"]


def _split_proportionally(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` entries over layers in proportion to their sizes, summing to exactly ``total``.

    Largest-remainder apportionment in exact integer arithmetic: every layer gets ``floor(total * size / N)`` and
    the leftover entries go to the largest remainders, ties to the earlier layer, so the split is deterministic.
    """
    grand = sum(sizes)
    if grand == 0:
        return [0 for _ in sizes]
    counts = [total * size // grand for size in sizes]
    remainders = [total * size % grand for size in sizes]
    leftover = total - sum(counts)
    for position in sorted(range(len(sizes)), key=lambda i: (-remainders[i], i))[:leftover]:
        counts[position] += 1
    return counts


def allocate_budget(sizes: Sequence[int], density: float, num_tunable_weights: int | None, budget: str) -> list[int]:
    """Number of trainable entries per layer before any salience-based selection.

    Args:
        sizes: ``out * in`` of each targeted layer.
        density: fraction of weights to train (used when ``num_tunable_weights`` is ``None``).
        num_tunable_weights: absolute total; split in proportion to layer size, summing exactly.
        budget: ``"local"`` gives each layer ``round(density * size)``; ``"global"`` takes ``round(density * N)``
            in total, split in proportion to layer size until salience redistributes it.

    Raises:
        ValueError: if the requested total exceeds the number of targeted weights.
    """
    grand = sum(sizes)
    if num_tunable_weights is not None:
        if num_tunable_weights > grand:
            raise ValueError(
                f"SparseConfig.num_tunable_weights={num_tunable_weights} exceeds the {grand} weights of the "
                f"{len(sizes)} targeted layers"
            )
        return _split_proportionally(num_tunable_weights, sizes)
    if budget == "local":
        return [min(size, int(density * size + 0.5)) for size in sizes]
    return _split_proportionally(min(grand, int(density * grand + 0.5)), sizes)


def lora_equivalent_budget(
    model: nn.Module,
    r: int,
    target_modules: list[str] | str,
    exclude_modules: list[str] | str | None = None,
    task_type: str | None = None,
) -> int:
    """Number of trainable parameters a LoRA adapter of rank ``r`` on the same layers would have.

    LoRA adds ``r * (in + out)`` parameters to an ``out x in`` layer; summing that over the targeted layers gives
    the ``num_tunable_weights`` at which a sparse adapter and a LoRA adapter are compared fairly. Pass the
    adapters' ``task_type``: with ``target_modules="all-linear"`` it decides, as in peft, which output layer (e.g.
    a sequence classifier, trained densely through ``modules_to_save``) is left out.

    Example:
        ```py
        >>> budget = lora_equivalent_budget(base, r=8, target_modules=["q_proj", "v_proj"])
        >>> config = SparseConfig(target_modules=["q_proj", "v_proj"], num_tunable_weights=budget)
        ```
    """
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"lora_equivalent_budget: r must be a positive int, got {r!r}")
    shapes = targeted_linear_shapes(model, target_modules, exclude_modules, task_type)
    if not shapes:
        raise ValueError(f"lora_equivalent_budget: target_modules={target_modules!r} matched no linear layer")
    return sum(r * (rows + cols) for rows, cols in shapes)


def targeted_linear_shapes(
    model: nn.Module,
    target_modules: list[str] | str,
    exclude_modules: list[str] | str | None = None,
    task_type: str | None = None,
) -> list[tuple[int, int]]:
    """The logical ``(out, in)`` shape of every linear layer (``nn.Linear``, GPT-2 ``Conv1D``) an adapter with these
    ``target_modules`` / ``exclude_modules`` / ``task_type`` would target, in module order, as peft resolves them
    (``"all-linear"`` included)."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
    from transformers.pytorch_utils import Conv1D

    from .config import SparseConfig

    config = SparseConfig(target_modules=target_modules, exclude_modules=exclude_modules, task_type=task_type)
    config = _maybe_include_all_linear_layers(config, model)
    shapes = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or not check_target_module_exists(config, name):
            continue
        if isinstance(module, nn.Linear):  # the module's sizes, not the weight's: a 4-bit weight is stored packed
            shapes.append((module.out_features, module.in_features))
        else:  # Conv1D stores its weight as (in, out)
            shapes.append((module.weight.shape[1], module.weight.shape[0]))
    return shapes
