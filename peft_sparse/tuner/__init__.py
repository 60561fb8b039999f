"""The peft tuner for sparse fine-tuning: config, layers, model and registration with peft."""

from .budget import allocate_budget, lora_equivalent_budget
from .config import SparseConfig
from .layer import Linear, SparseLayer
from .model import SparseModel
from .registration import SPARSE_PEFT_TYPE, register

register()

__all__ = [
    "SPARSE_PEFT_TYPE",
    "Linear",
    "SparseConfig",
    "SparseLayer",
    "SparseModel",
    "allocate_budget",
    "lora_equivalent_budget",
]
