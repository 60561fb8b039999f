"""SpIEL-AG against a static random mask on a tiny Llama, over several seeds: is moving the mask worth it?

    python benchmarks/spiel_vs_static.py                       # seeds 0-4, 80 steps
    python benchmarks/spiel_vs_static.py --seeds 0 1 2 --steps 200

Both runs of a seed start from the same random mask (the same ``SparseConfig.seed``), with the same ``k`` (2 % of
every linear layer of a 2-layer, 32-wide Llama built from a config: no download), the same AdamW at lr 5e-2 and the
same batch of random tokens (8 x 16), trained to memorise it. SpIEL-AG prunes and regrows half of each layer's
entries every 10 steps (``accumulation_steps=3``, cosine decay of the rate); the static run keeps its mask.

Printed: per seed, the first loss and the final loss of each method (mean of the last 10 steps), then the medians
over seeds and the median of the per-seed ratios SpIEL / static (below 1: SpIEL ends lower). No assertion: this is a
measurement, formerly a unit test on two seeds (``tests/test_spiel.py``); the unit tests keep only that SpIEL learns.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import TARGETS, seeded_llama
from peft import get_peft_model

from peft_sparse import SparseConfig, SpIEL

VOCAB = 97
# The tests' tiny_llama (tests/tiny_models.py): 2 layers, hidden 32, MLP 48, 4 heads, 2 key/value heads.
SHAPE = {"hidden": 32, "intermediate": 48, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": VOCAB, "seq": 64}


def train(update: str, steps: int, seed: int) -> list[float]:
    """The training losses of one run (``update`` "spiel" or "static")."""
    config = SparseConfig(
        target_modules=TARGETS,
        density=0.02,
        update=update,
        update_interval=10,
        accumulation_steps=3,
        reselection_rate=0.5,
        seed=seed,
    )
    model = get_peft_model(seeded_llama(SHAPE, torch.float32, seed).eval(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    spiel = SpIEL(model, optimizer, num_training_steps=steps) if update == "spiel" else None
    model.train()
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(100 + seed))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if spiel is not None:
            spiel.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def final(losses: list[float]) -> float:
        return statistics.fmean(losses[-10:])

    print(
        f"SpIEL-AG vs a static random mask: tiny Llama, {args.steps} steps, seeds {args.seeds}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'seed':>4}  {'first loss':>10}  {'SpIEL final':>11}  {'static final':>12}  {'ratio':>6}  {'time':>6}")
    spiel_finals, static_finals, ratios = [], [], []
    for seed in args.seeds:
        start = time.perf_counter()
        spiel, static = train("spiel", args.steps, seed), train("static", args.steps, seed)
        spiel_finals.append(final(spiel))
        static_finals.append(final(static))
        ratios.append(final(spiel) / final(static))
        print(
            f"{seed:>4}  {spiel[0]:>10.4f}  {final(spiel):>11.4f}  {final(static):>12.4f}  {ratios[-1]:>6.3f}  "
            f"{time.perf_counter() - start:>5.1f}s"
        )
    print(
        f"median final loss: SpIEL {statistics.median(spiel_finals):.4f}, static "
        f"{statistics.median(static_finals):.4f}; median ratio SpIEL / static {statistics.median(ratios):.3f}; "
        f"SpIEL lower on {sum(r < 1 for r in ratios)} of {len(ratios)} seeds"
    )


if __name__ == "__main__":
    main()
