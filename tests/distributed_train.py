"""Run by tests/test_distributed.py: train tiny sparse Llamas with the Trainer and SparseTrainingCallback on one
process, or on two under ``torch.distributed.run`` (gloo, CPU) with FSDP2, DDP or DeepSpeed ZeRO, and write what the
tests compare.

    python distributed_train.py OUT_ROOT '{"fsdp-static": {"engine": "fsdp", "update": "static", ...}, ...}'

One launch runs several named runs one after the other in the same processes (importing torch, transformers and
peft costs each process about six seconds, the tiny runs themselves one to three), all with the same ``engine``:
between runs accelerate's process-wide state is reset; the process group stays.

Options (JSON) of a run: ``engine`` ("single", "ddp", "fsdp", "zero2", "zero3"), ``update``, ``budget``,
``selection``, ``r`` (the hybrid's low-rank term), ``batch`` (per process), ``steps``, ``select_before_wrapping``
(call ``select_mask`` on the trainer's dataloader before ``trainer.train()``, so a global budget may give layers
k = 0), ``optimizer`` ("adamw" or "sm3"),
``quantised`` (a 4-bit NF4 base; ``quant_storage`` names its storage dtype), ``save_steps``, ``resume`` (a checkpoint
folder name) with ``resume_from`` (the earlier run of this launch whose checkpoint it resumes), ``expect_error``
(the run must fail: its message is recorded and the launch goes on) and ``probe`` ("select_mask_on_shards": no
training; ``select_mask`` on a model sharded by ``fully_shard`` directly).

Writes ``OUT_ROOT/NAME/rank{r}.pt`` (every layer's indices and whole values, gathered where FSDP2 shards them, and
the ``sparse/`` log entries) and, from ``trainer.save_model``, the adapter in ``OUT_ROOT/NAME/adapter``; for an
expected failure ``OUT_ROOT/NAME/error-rank{r}.json`` (the message and the optimizer steps taken before it); for a
probe ``OUT_ROOT/NAME/probe-rank{r}.json``.

accelerate turns FSDP on only for accelerator device types (its ``AcceleratorState`` leaves a CPU run as
``MULTI_CPU``), so on CPU the trainer below switches both shared states to FSDP after the Trainer built its Accelerator:
from there on it is accelerate's own FSDP2 path (``fsdp2_prepare_model`` wrapping every ``LlamaDecoderLayer`` and
the model with ``fully_shard``, FSDP2 optimizer parameter swap, full-state-dict saving) that runs, over gloo.
DeepSpeed runs on its own CPU accelerator (``DS_ACCELERATOR=cpu``, gloo); there accelerate needs to be told the
process group (see ``deepspeed_on_cpu``).
"""

import gc
import json
import os
import shutil
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


def without_deepspeed_shared_memory_allreduce() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce when its process group comes up (30-50 s,
    once per machine and Python environment, so in every CI run); gloo carries these tiny runs' collectives too."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


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


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def on_rank_zero_then_wait(action) -> None:
    """``action()`` on rank 0 only (a file every rank then reads), the other ranks waiting until it is done."""
    if rank() == 0:
        action()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def train(root: Path, name: str, options: dict, started: list) -> None:
    out_dir = root / name
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
        r=options.get("r", 0),  # r > 0: the sparse + low-rank hybrid
    )
    if options.get("quantised"):
        storage = getattr(torch, options.get("quant_storage", "uint8"))
        # bitsandbytes runs the untargeted 4-bit layers; its CPU kernels want in_features a multiple of 64.
        directory = out_dir / f"base-{storage}"
        on_rank_zero_then_wait(lambda: tiny_llama_aligned().save_pretrained(directory))  # every rank quantises it
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
        without_deepspeed_shared_memory_allreduce()
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
    started.append(trainer)
    resume = options.get("resume")
    if resume:  # the earlier run's checkpoint, where the Trainer looks for it
        source = root / options["resume_from"] / "run" / resume
        on_rank_zero_then_wait(lambda: shutil.copytree(source, out_dir / "run" / resume))
    trainer.train(resume_from_checkpoint=str(out_dir / "run" / resume) if resume else None)
    trainer.save_model(str(out_dir / "adapter"))
    torch.save({"state": sparse_state(model), "log": sparse_log(trainer)}, out_dir / f"rank{rank()}.pt")


def probe_select_mask_on_shards() -> dict:
    """``select_mask`` on a model whose values ``fully_shard`` made DTensors: moving the budget between layers is
    refused (each layer's k is fixed by the layout); keeping the layer sizes works."""
    from torch.distributed.fsdp import fully_shard

    from peft_sparse import SparseLayer

    def sizes() -> list[int]:
        return [m.sparse_values["default"].shape[0] for m in model.modules() if isinstance(m, SparseLayer)]

    model = trainer_helpers.sparse_model(selection="gradient", budget="global")
    fully_shard(model)
    batches = [{key: value.unsqueeze(0) for key, value in TokenData()[i].items()} for i in range(2)]
    result = {"refused": None}
    try:
        select_mask(model, batches)
    except ValueError as error:
        result["refused"] = str(error)
    before = sizes()
    select_mask(model, batches, keep_layer_sizes=True)
    result["kept"] = sizes() == before
    return result


def reset_process_state() -> None:
    """Forget accelerate's (and transformers' DeepSpeed) process-wide state of the last run; the process group
    stays and the next run's ``PartialState`` adopts it."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    unset_hf_deepspeed_config()
    gc.collect()


def main() -> None:
    root, plan = Path(sys.argv[1]), json.loads(sys.argv[2])
    for name, options in plan.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        if options.get("probe") == "select_mask_on_shards":
            result = probe_select_mask_on_shards()
            (root / name / f"probe-rank{rank()}.json").write_text(json.dumps(result))
            continue
        started: list = []
        try:
            train(root, name, options, started)
        except Exception as error:
            if not options.get("expect_error"):
                raise
            steps = started[0].state.global_step if started else None
            record = {"message": f"{type(error).__name__}: {error}", "steps": steps}
            (root / name / f"error-rank{rank()}.json").write_text(json.dumps(record))
        finally:
            reset_process_state()
    if torch.distributed.is_initialized():
        # Leave together and tear the process group down before the interpreter does: a rank that exits while
        # gloo's threads still serve the other one can abort ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
