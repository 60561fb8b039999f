"""Finding a sparse adapter and its layers in a model: the one place selection, SpIEL, the Trainer callback, SM3 and
the tuner itself look them up."""

from __future__ import annotations

from torch import nn

from .config import SparseConfig
from .layer import SparseLayer

__all__ = ["resolve_adapter", "sparse_layers"]


def resolve_adapter(model: nn.Module, adapter_name: str | None, caller: str) -> tuple[nn.Module, str, SparseConfig]:
    """The module that holds the sparse layers, the adapter's name and its config.

    ``model`` is a ``PeftModel`` or a ``SparseModel``; ``adapter_name=None`` means the active adapter. ``caller``
    prefixes the error messages.

    Raises:
        TypeError: ``model`` holds no peft adapters.
        ValueError: the adapter does not exist, cannot be told (no active one), or is not a sparse adapter.
    """
    tuner = getattr(model, "base_model", model)
    peft_config = getattr(tuner, "peft_config", None)
    if not isinstance(peft_config, dict):
        raise TypeError(f"{caller}: expected a peft model with a sparse adapter, got {type(model).__name__}")
    if adapter_name is None:
        active = getattr(tuner, "active_adapter", None)
        adapter_name = (active[0] if active else None) if isinstance(active, (list, tuple)) else active
        if not isinstance(adapter_name, str):
            raise ValueError(f"{caller}: the model has no active adapter to default to; pass adapter_name")
    if adapter_name not in peft_config:
        raise ValueError(f"{caller}: adapter_name {adapter_name!r} does not exist; adapters: {list(peft_config)}")
    config = peft_config[adapter_name]
    if not isinstance(config, SparseConfig):
        raise ValueError(  # noqa: TRY004 -- the argument is a name; what it names is the wrong kind of adapter
            f"{caller}: adapter {adapter_name!r} is a {type(config).__name__}, not a SparseConfig"
        )
    return (tuner.model if hasattr(tuner, "model") else tuner), adapter_name, config


def sparse_layers(module: nn.Module, adapter_name: str | None = None) -> list[tuple[str, SparseLayer]]:
    """``(name, layer)`` of every sparse layer under ``module`` that holds ``adapter_name`` (``None``: every sparse
    layer), in module order."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, SparseLayer) and (adapter_name is None or adapter_name in m.sparse_values)
    ]
