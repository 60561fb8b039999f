"""One Trainer run of a tiny sparse Llama for tests/test_resume.py, in its own process: the uninterrupted run (with
or without a checkpoint after every optimizer step) or a run resumed from one of those checkpoints. Writes the final
indices, values and optimizer state to ``OUT``.

    python tests/resume_run.py MODE ACCUMULATION OUTPUT_DIR OUT [--save-every-step] [--resume CHECKPOINT]

MODE: static, dynamic, spiel_ag, spiel_ma, hybrid_dynamic or hybrid_spiel_ag (those two with a rank-4 term). The
Trainer is the default one (a shuffling sampler: resuming mid-epoch must not depend on which loader order the process
happens to hold), 8 rows in batches of 2, so an epoch is 4 micro-batches (4 optimizer steps without accumulation, 2
with two micro-batches each) and the 7-step run crosses epochs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import tiny_llama
from trainer_helpers import DEFAULT_ARGS, TARGETS, TokenData, low_rank_factors

MAX_STEPS = 7
MODES = {
    "static": {"selection": "gradient"},
    "dynamic": {"selection": "gradient", "update": "dynamic", "update_interval": 2},
    "spiel_ag": {
        "selection": "gradient",
        "update": "spiel",
        "regrow": "gradient",
        "update_interval": 3,
        "accumulation_steps": 2,
        "reselection_rate": 0.5,
    },
    "spiel_ma": {
        "selection": "gradient",
        "update": "spiel",
        "regrow": "momentum",
        "update_interval": 3,
        "reselection_rate": 0.5,
    },
}
# the sparse + low-rank hybrid (RoSA): the factors and their optimizer state must resume with the entries
MODES["hybrid_dynamic"] = {**MODES["dynamic"], "r": 4}
MODES["hybrid_spiel_ag"] = {**MODES["spiel_ag"], "r": 4}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("accumulation", type=int)
    parser.add_argument("output_dir")
    parser.add_argument("out")
    parser.add_argument("--save-every-step", action="store_true")
    parser.add_argument("--resume")
    args = parser.parse_args()

    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from peft_sparse import SparseConfig, SparseLayer, SparseTrainingCallback

    torch.use_deterministic_algorithms(True)
    config = SparseConfig(target_modules=TARGETS, density=0.05, salience_batches=2, **MODES[args.mode])
    model = get_peft_model(tiny_llama(), config)
    if args.resume and args.mode == "spiel_ma":
        # SM3 is built by hand below, before the Trainer loads the checkpoint: it must hold the checkpoint's (resized)
        # values parameters
        model.load_adapter(args.resume, adapter_name="default")
    training = TrainingArguments(
        **{
            **DEFAULT_ARGS,
            "output_dir": args.output_dir,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": args.accumulation,
            "max_steps": MAX_STEPS,
            "save_strategy": "steps" if args.save_every_step else "no",
            "save_steps": 1,
            "data_seed": 0,
        }
    )
    trainer = Trainer(
        model=model, args=training, train_dataset=TokenData(size=8), callbacks=[SparseTrainingCallback()]
    )
    if args.mode == "spiel_ma":
        from peft_sparse.optim import SM3

        trainer.optimizer = SM3(model, lr=0.05)
    trainer.train(resume_from_checkpoint=args.resume)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, SparseLayer)}
    torch.save(
        {
            "indices": {name: layer.sparse_indices["default"].clone() for name, layer in layers.items()},
            "values": {name: layer.sparse_values["default"].detach().clone() for name, layer in layers.items()},
            "residual": {name: layer.sparse_residual_indices["default"].clone() for name, layer in layers.items()},
            "low_rank": low_rank_factors(model),
            "optimizer": trainer.optimizer.state_dict(),
            "log": [e for e in trainer.state.log_history if any(k.startswith("sparse/") for k in e)],
        },
        args.out,
    )


if __name__ == "__main__":
    main()
