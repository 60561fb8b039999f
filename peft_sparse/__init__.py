"""peft-sparse: sparse fine-tuning of large language models for the Hugging Face stack.

Importing this package registers ``PeftType.SPARSE`` with upstream ``peft``, after which ``get_peft_model``,
``PeftConfig.from_pretrained`` and ``PeftModel.from_pretrained`` handle sparse adapters like built-in ones.
Usage, options and results: README.md.
"""

from .selection import SelectionReport, SpIEL, SpielReport, select_mask, update_mask
from .shipped import shipped_model_path
from .training import SparseTrainingCallback
from .tuner import SparseConfig, SparseLayer, SparseModel, lora_equivalent_budget
from .version import __version__

__all__ = [
    "SelectionReport",
    "SpIEL",
    "SparseConfig",
    "SparseLayer",
    "SparseModel",
    "SparseTrainingCallback",
    "SpielReport",
    "__version__",
    "lora_equivalent_budget",
    "select_mask",
    "shipped_model_path",
    "update_mask",
]
