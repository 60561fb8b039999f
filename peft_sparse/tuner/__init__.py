"""The peft tuner for sparse fine-tuning: config, layers, model and registration with peft."""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .budget import allocate_budget, lora_equivalent_budget
from .config import SparseConfig
from .layer import Linear, SparseLayer
from .model import SparseModel
from .registration import PEFT_METHOD_NAME, PREFIX, SPARSE_PEFT_TYPE

__all__ = [
    "SPARSE_PEFT_TYPE",
    "Linear",
    "SparseConfig",
    "SparseLayer",
    "SparseModel",
    "allocate_budget",
    "lora_equivalent_budget",
    "register",
]


def register() -> None:
    """Register :class:`SparseConfig` and :class:`SparseModel` with peft (a no-op when already registered)."""
    registered_config = PEFT_TYPE_TO_CONFIG_MAPPING.get(SPARSE_PEFT_TYPE)
    registered_model = PEFT_TYPE_TO_TUNER_MAPPING.get(SPARSE_PEFT_TYPE)
    if registered_config is not None or registered_model is not None:
        # Re-registering after a module reload would point peft at stale classes from a previous import; keep the
        # first registration, which is what objects already created refer to.
        if registered_config.__qualname__ == SparseConfig.__qualname__:
            return
        raise RuntimeError(f"PeftType.SPARSE is already registered to {registered_config!r}")
    register_peft_method(name=PEFT_METHOD_NAME, config_cls=SparseConfig, model_cls=SparseModel, prefix=PREFIX)


register()
