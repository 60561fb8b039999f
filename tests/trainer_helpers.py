"""A tiny Llama, a fixed token data set and a Trainer with a sequential sampler, shared by the callback tests and the
multi-process script (``distributed_train.py``). Sequential sampling makes a run with batch 2b on one process see the same
global batches as a run with batch b on each of two processes (accelerate hands out whole batches round-robin)."""

from __future__ import annotations

import socket

import torch
from peft import get_peft_model
from tiny_models import VOCAB, tiny_llama
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainingArguments

from peft_sparse import SparseConfig, SparseLayer, SparseTrainingCallback
from peft_sparse._distributed import whole

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


class TokenData(Dataset):
    def __init__(self, size: int = 64, length: int = 12, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (size, length), generator=generator)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class SequentialTrainer(Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def sparse_model(**config):
    config.setdefault("target_modules", TARGETS)
    config.setdefault("density", 0.05)
    config.setdefault("salience_batches", 2)
    return get_peft_model(tiny_llama(), SparseConfig(**config))


DEFAULT_ARGS = {
    "use_cpu": True,
    "report_to": [],
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-2,
    "max_steps": 8,
    "logging_steps": 1,
    "save_strategy": "no",
    "seed": 0,
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "lr_scheduler_type": "constant",
}


def make_trainer(model, output_dir, callback=None, **args) -> SequentialTrainer:
    arguments = TrainingArguments(**{**DEFAULT_ARGS, "output_dir": str(output_dir), **args})
    return SequentialTrainer(
        model=model, args=arguments, train_dataset=TokenData(), callbacks=[callback or SparseTrainingCallback()]
    )


def sparse_state(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every sparse layer's indices and values (whole: gathered where FSDP2 shards them, a collective then)."""
    return {
        name: (m.sparse_indices["default"].clone(), whole(m.sparse_values["default"].detach()).clone())
        for name, m in model.named_modules()
        if isinstance(m, SparseLayer)
    }


def low_rank_factors(model) -> dict[str, torch.Tensor]:
    """Copies of the sparse + low-rank hybrid's factors (``sparse_lora_A`` / ``sparse_lora_B``), by parameter name;
    empty for a plain sparse adapter."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if "sparse_lora_" in name}


def free_port() -> int:
    """A TCP port nobody listens on now, for ``torch.distributed.run --master_port``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sparse_log(trainer) -> list[dict]:
    """The ``sparse/...`` entries SparseTrainingCallback added to the Trainer's log history."""
    return [entry for entry in trainer.state.log_history if any(key.startswith("sparse/") for key in entry)]
