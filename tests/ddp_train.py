"""Run by tests/test_training.py: train a tiny sparse Llama with the Trainer and SparseTrainingCallback, on one
process or under ``torch.distributed.run`` (gloo, CPU), and save every rank's adapter state.

    python ddp_train.py OUT_DIR UPDATE PER_DEVICE_BATCH
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_helpers import make_trainer, sparse_model, sparse_state  # noqa: E402


def main() -> None:
    out_dir, update, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    model = sparse_model(selection="gradient", budget="local", update=update, update_interval=3,
                         accumulation_steps=2, reselection_rate=0.3)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    trainer = make_trainer(model, out_dir / "run", per_device_train_batch_size=batch, max_steps=7,
                           **({"ddp_backend": "gloo"} if distributed else {}))
    trainer.train()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    log = [entry for entry in trainer.state.log_history if any(key.startswith("sparse/") for key in entry)]
    torch.save({"state": sparse_state(model), "log": log}, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
