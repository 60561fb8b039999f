"""Run by tests/test_distributed.py: train a tiny sparse Llama with the Trainer and SparseTrainingCallback on one
process, or on two under ``torch.distributed.run`` (gloo, CPU) with FSDP2, DDP or DeepSpeed ZeRO, and write what the
tests compare.

    python distributed_train.py OUT_DIR '{"engine": "fsdp", "update": "static", ...}'

Options (JSON): ``engine`` ("single", "ddp", "fsdp", "zero2", "zero3"), ``update``, ``budget``, ``selection``,
``batch`` (per process), ``steps``, ``select_before_wrapping`` (call ``select_mask`` on the trainer's dataloader before
``trainer.train()``, so a global budget may give layers k = 0), ``optimizer`` ("adamw" or "sm3"), ``quantised``
(a 4-bit NF4 base; ``quant_storage`` names its storage dtype), ``save_steps`` and ``resume`` (a checkpoint folder
name to resume from).

Writes ``OUT_DIR/rank{r}.pt`` (every layer's indices and whole values, gathered where FSDP2 shards them, and the
``sparse/`` log entries) and, from ``trainer.save_model``, the adapter in ``OUT_DIR/adapter``.

accelerate turns FSDP on only for accelerator device types (its ``AcceleratorState`` leaves a CPU run as
``MULTI_CPU``), so on CPU the trainer below switches both shared states to FSDP after the Trainer built its Accelerator:
from there on it is accelerate's own FSDP2 path (``fsdp2_prepare_model`` wrapping every ``LlamaDecoderLayer`` and
the model with ``fully_shard``, FSDP2 optimizer parameter swap, full-state-dict saving) that runs, over gloo.
DeepSpeed runs on its own CPU accelerator (``DS_ACCELERATOR=cpu``, gloo); there accelerate needs to be told the
process group (see ``deepspeed_on_cpu``).
"""

import json
import os
import sys
from pathlib import Path

import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trainer_helpers
from tiny_models import quantised_model, tiny_llama, tiny_llama_aligned
from trainer_helpers import SequentialTrainer, TokenData, sparse_log, sparse_state

from peft_sparse import SparseConfig, SparseTrainingCallback, select_mask


class FSDPOnCPUTrainer(SequentialTrainer):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        from accelerate import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap="LlamaDecoderLayer",
            state_dict_type="FULL_STATE_DICT",
            reshard_after_forward=True,
            cpu_ram_efficient_loading=False,
        )
        # Both shared states: every AcceleratorState() built later copies PartialState's over its own.
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True


def deepspeed_on_cpu(arguments) -> None:
    """Without an accelerator device accelerate leaves its process state single-process under DeepSpeed (no
    backend, so one process, every rank reading every batch) while DeepSpeed itself initialises gloo over all
    ranks; tell accelerate the process group DeepSpeed built, so the dataloader is sharded as on GPUs."""
    from accelerate import PartialState

    _ = arguments.device  # reading it sets up accelerate's and DeepSpeed's process state
    state = PartialState()
    state.backend = "gloo"
    state.num_processes = torch.distributed.get_world_size()
    state.process_index = state.local_process_index = torch.distributed.get_rank()


class SM3Trainer(SequentialTrainer):
    """Builds peft-sparse's SM3 (SpIEL-MA's optimizer). The Trainer refuses ``optimizers=(...)`` under FSDP (the
    optimizer must be built on the wrapped model's parameters), so it is built here, where the Trainer builds its
    own, after wrapping."""

    def create_optimizer(self, model=None):
        from peft_sparse.optim import SM3

        if self.optimizer is None:
            self.optimizer = SM3(self.model_wrapped if model is None else model, lr=0.05)
        return self.optimizer


def main() -> None:
    out_dir, options = Path(sys.argv[1]), json.loads(sys.argv[2])
    engine = options.get("engine", "single")
    config = SparseConfig(
        target_modules=trainer_helpers.TARGETS,
        density=0.05,
        salience_batches=2,
        selection=options.get("selection", "gradient"),
        budget=options.get("budget", "local"),
        update=options.get("update", "static"),
        update_interval=3,
        accumulation_steps=2,
        reselection_rate=0.3,
        regrow=options.get("regrow", "gradient"),
    )
    if options.get("quantised"):
        storage = getattr(torch, options.get("quant_storage", "uint8"))
        # bitsandbytes runs the untargeted 4-bit layers; its CPU kernels want in_features a multiple of 64.
        directory = out_dir / f"base-{storage}-rank{os.environ.get('RANK', '0')}"  # no two processes write one
        base = quantised_model(
            directory,
            tiny_llama_aligned,
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=storage,
        )
    else:
        base = tiny_llama()
    model = get_peft_model(base, config)
    args = {"per_device_train_batch_size": options.get("batch", 4), "max_steps": options.get("steps", 6)}
    if engine != "single":
        args["ddp_backend"] = "gloo"
    if engine.startswith("zero"):  # "zero2", "zero3": DeepSpeed ZeRO on its CPU accelerator
        args["deepspeed"] = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": {"stage": int(engine[-1])},
            "zero_allow_untested_optimizer": True,
        }
        args["use_cpu"] = False  # accelerate turns DeepSpeed off for use_cpu; DS_ACCELERATOR=cpu keeps it on CPU
    if engine == "ddp":
        # as plain DDP: layers a global budget leaves empty must not need the unused-parameter search (which the
        # Trainer switches on for peft models by default)
        args["ddp_find_unused_parameters"] = False
    if options.get("save_steps"):
        args.update(save_strategy="steps", save_steps=options["save_steps"])
    trainer_class = FSDPOnCPUTrainer if engine == "fsdp" else SequentialTrainer
    if options.get("optimizer") == "sm3":
        trainer_class = type("SM3" + trainer_class.__name__, (SM3Trainer, trainer_class), {})
    arguments = trainer_helpers.TrainingArguments(
        **{**trainer_helpers.DEFAULT_ARGS, "output_dir": str(out_dir / "run"), **args}
    )
    if engine.startswith("zero"):
        deepspeed_on_cpu(arguments)
    trainer = trainer_class(
        model=model, args=arguments, train_dataset=TokenData(), callbacks=[SparseTrainingCallback()]
    )
    if options.get("select_before_wrapping"):
        model.train()  # as the Trainer's own selection does (see SparseTrainingCallback._select)
        select_mask(model, trainer.get_train_dataloader())
    resume = options.get("resume")
    trainer.train(resume_from_checkpoint=str(out_dir / "run" / resume) if resume else None)
    trainer.save_model(str(out_dir / "adapter"))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save({"state": sparse_state(model), "log": sparse_log(trainer)}, out_dir / f"rank{rank}.pt")
    if torch.distributed.is_initialized():
        # Leave together and tear the process group down before the interpreter does: a rank that exits while
        # gloo's threads still serve the other one can abort ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
