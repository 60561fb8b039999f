"""FSDP2 vs DDP with a sparse adapter: per-rank memory and step time, two processes, as ratios in one run.

    python benchmarks/distributed_bench.py            # CPU, gloo, 2 processes
    python benchmarks/distributed_bench.py --write    # and replace this section of benchmarks/RESULTS.md

The same Llama-shaped model (``--hidden`` / ``--intermediate`` / ``--layers``, fp32) gets a peft-sparse adapter on
every linear layer (``--density``, random static mask) and trains with AdamW on random tokens, wrapped either in
``DistributedDataParallel`` or, as accelerate's FSDP2 plugin does it, with ``fully_shard`` on every decoder layer and
then on the model. Each engine runs ``--rounds`` times, alternating (a slow phase of the machine hits both alike).

Per rank it records:

* model state: the bytes of the parameters, gradients and optimizer state this rank holds after a step (its local
  shards under FSDP), i.e. what sharding is meant to divide;
* RSS growth once wrapped: ``VmRSS`` after wrapping minus ``VmRSS`` before the model was built (every rank builds
  the whole model first, as ``from_pretrained`` without meta-device loading does; sharding then frees the rest);
* peak RSS growth while training: ``VmHWM``, restarted after wrapping, at the end, minus the same starting point
  (includes activations, all-gathered parameters, communication buffers and allocator slack; CPU only);
* step time: the median over ``--steps`` timed optimizer steps (forward, backward, AdamW) after ``--warmup``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    from peft_sparse._memory import process_status_kib

    return process_status_kib(field) or 0


def _local_bytes(tensor) -> int:
    from peft_sparse._distributed import is_sharded

    local = tensor.to_local() if is_sharded(tensor) else tensor
    return local.numel() * local.element_size()


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_sparse import SparseConfig

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rss_before = _status_kib("VmRSS")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=args.tokens,
    )
    model = get_peft_model(
        LlamaForCausalLM(config), SparseConfig(target_modules="all-linear", density=args.density, selection="random")
    )
    if args.engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    import gc

    gc.collect()
    rss_wrapped = _status_kib("VmRSS")
    from peft_sparse._memory import reset_peak_memory

    reset_peak_memory("cpu")  # the peak measured is that of training alone
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=generator)

    def step() -> None:
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated: they are part of the state measured

    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    state_bytes = sum(_local_bytes(p) for p in wrapped.parameters())
    state_bytes += sum(_local_bytes(p.grad) for p in wrapped.parameters() if p.grad is not None)
    state_bytes += sum(
        _local_bytes(t)
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    record = {
        "rank": rank,
        "state_bytes": state_bytes,
        "rss_after_wrap_kib": rss_wrapped - rss_before,
        "rss_training_peak_kib": _status_kib("VmHWM") - rss_before,
        "step_seconds": statistics.median(times),
    }
    Path(args.out).with_suffix(f".rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _launch(engine: str, args, out: Path) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    forwarded = [
        f"--{name}={getattr(args, name)}"
        for name in ("hidden", "intermediate", "layers", "vocab", "tokens", "batch", "density", "steps", "warmup")
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        __file__,
        "--worker",
        engine,
        f"--out={out}",
        *forwarded,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=["ddp", "fsdp"])
    parser.add_argument("--out")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--write", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.worker:
        args.engine = args.worker
        worker(args)
        return

        from common import machine, write_section

    results: dict[str, list[list[dict]]] = {"ddp": [], "fsdp": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for engine in ("ddp", "fsdp"):
                results[engine].append(_launch(engine, args, Path(tmp) / f"{engine}{round_index}"))

    def median(engine: str, key: str) -> float:
        return statistics.median(rank[key] for run in results[engine] for rank in run)

    rows = []
    for key, label, scale in (
        ("state_bytes", "model state (params + grads + AdamW state), MiB", 2**20),
        ("rss_after_wrap_kib", "RSS growth once wrapped, MiB", 1024),
        ("rss_training_peak_kib", "peak RSS growth while training, MiB", 1024),
        ("step_seconds", "step time (median), ms", 1e-3),
    ):
        ddp, fsdp = median("ddp", key), median("fsdp", key)
        rows.append(f"| {label} | {ddp / scale:.1f} | {fsdp / scale:.1f} | {fsdp / ddp:.2f} |")
    import torch

    torch.set_num_threads(args.threads)
    section = "\n".join(
        [
            "## FSDP2 vs DDP with a sparse adapter (`benchmarks/distributed_bench.py`)",
            "",
            f"Command: `python benchmarks/distributed_bench.py --write` (defaults: hidden {args.hidden}, intermediate "
            f"{args.intermediate}, {args.layers} layers, vocab {args.vocab}, fp32; all-linear adapter at density "
            f"{args.density}; batch {args.batch} x {args.tokens} tokens per rank; {args.rounds} alternating rounds of "
            f"{args.steps} timed steps), run on {date.today().isoformat()}.",
            "",
            f"### CPU: 2 processes over gloo, {machine('cpu')} each",
            "",
            "| per rank | DDP | FSDP2 | FSDP2 / DDP |",
            "|---|---|---|---|",
            *rows,
            "",
            "Medians over both ranks and all rounds. Model state is what sharding divides: each rank holds half of every "
            "parameter (the frozen base included) and of the values' gradients and AdamW moments. The peak RSS while "
            "training is not: FSDP2 all-gathers each layer's whole weights for its forward and again for its backward, "
            "and on the CPU those buffers come from malloc, whose freed memory glibc keeps for reuse, so the high-water "
            "mark can count several of them. The step time is FSDP's trade: with a frozen base DDP communicates only the "
            "values' gradients (about 1% of the weights here), FSDP2 moves every layer's weights twice per step.",
        ]
    )
    print(section)
    if args.write:
        write_section(ROOT / "benchmarks" / "RESULTS.md", section)


if __name__ == "__main__":
    main()
