"""4-bit sparse fine-tuning vs QLoRA vs the frozen 4-bit base: step time and peak memory, as ratios in one run.

    python benchmarks/qlora_bench.py                  # CPU (small shapes); plus GPU (7B-class shapes) when present
    python benchmarks/qlora_bench.py --device cuda --write

The model is a stack of blocks shaped like a 7B Llama's projections (GPU: hidden 4096, intermediate 11008, so the
layers are 4096x4096, 4096x11008 and 11008x4096; CPU: 512 / 1376), every layer a bitsandbytes ``Linear4bit`` (NF4,
double quantisation, bf16 compute). Three configurations over the same quantised weights:

* frozen base: no adapter, backward to the input only (the cost every adapter pays on top of its own);
* QLoRA: peft LoRA of rank ``r`` on every layer;
* sparse: a peft-sparse adapter with exactly LoRA's trainable-parameter count (about 0.5% density at r=10 on the
  GPU shapes), random mask.

Each step is forward + backward (+ AdamW for the adapters) on ``tokens`` random bf16 input rows. Step times are
medians over rounds that interleave the three configurations (a slow phase of the machine hits all alike); peak
memory comes from a subprocess per configuration (peak allocated on GPU, VmHWM on CPU).
"""

from __future__ import annotations

import argparse
import sys
from datetime import date

import torch
from common import compare_steps, machine, publish, steps_peak_memory
from torch import nn

from peft_sparse import ops

SHAPES = {
    "cuda": {"hidden": 4096, "intermediate": 11008, "blocks": 2, "tokens": [2048, 8192], "lora_r": 10},
    "cpu": {"hidden": 512, "intermediate": 1376, "blocks": 2, "tokens": [512], "lora_r": 8},
}
TARGETS = ["attn", "up", "down"]


class Block(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.attn = nn.Linear(hidden, hidden, bias=False)
        self.up = nn.Linear(hidden, intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.down(nn.functional.silu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, hidden: int, intermediate: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(hidden, intermediate) for _ in range(blocks))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def quantised_stack(device: str) -> Stack:
    """The stack with every Linear replaced by an NF4 double-quantised bitsandbytes Linear4bit (bf16 compute)."""
    import bitsandbytes as bnb

    shape = SHAPES[device]
    torch.manual_seed(0)
    model = Stack(shape["hidden"], shape["intermediate"], shape["blocks"])
    for block in model.blocks:
        for name in TARGETS:
            dense = getattr(block, name)
            with torch.no_grad():
                dense.weight.mul_(0.5)  # keep the residual stream tame over the blocks
            layer = bnb.nn.Linear4bit(
                dense.in_features,
                dense.out_features,
                bias=False,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
            )
            layer.weight = bnb.nn.Params4bit(
                dense.weight.data.to(torch.bfloat16),
                requires_grad=False,
                compress_statistics=True,
                quant_type="nf4",
                module=layer,
            )
            setattr(block, name, layer)
    return model.to(device)


def build_step(method: str, device: str, tokens: int):
    from peft import LoraConfig, get_peft_model

    from peft_sparse import SparseConfig, lora_equivalent_budget

    shape = SHAPES[device]
    model = quantised_stack(device)
    if method == "qlora":
        model = get_peft_model(model, LoraConfig(target_modules=TARGETS, r=shape["lora_r"], lora_alpha=16))
    elif method == "sparse":
        budget = lora_equivalent_budget(model, r=shape["lora_r"], target_modules=TARGETS)
        model = get_peft_model(model, SparseConfig(target_modules=TARGETS, num_tunable_weights=budget))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, shape["hidden"], generator=generator).to(device=device, dtype=torch.bfloat16)
    if method == "base":
        x.requires_grad_(True)

    def step():
        out = model(x)
        out.float().square().mean().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            x.grad = None

    return step, sum(p.numel() for p in params)


def peak_memory(method: str, device: str, tokens: int) -> int:
    return steps_peak_memory(build_step(method, device, tokens)[0], device)


def bench(device: str, tokens: int, repeats: int) -> dict:
    return compare_steps(
        __file__,
        lambda method: build_step(method, device, tokens),
        ("base", "qlora", "sparse"),
        device,
        repeats,
        references=("base", "qlora"),
        peak_memory_args=("--tokens", str(tokens)),
    )


def table(results: dict, tokens: int) -> list[str]:
    base, qlora, sparse = results["base"], results["qlora"], results["sparse"]
    lines = [
        f"**{tokens} tokens**",
        "",
        "| | trainable | step (ms, median) | step / frozen base | step / QLoRA | peak memory (MiB) | memory / QLoRA |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in (("frozen 4-bit base (limit)", base), ("QLoRA", qlora), ("sparse 4-bit", sparse)):
        lines.append(
            f"| {name} | {r['trainable']:,} | {r['step_ms']:.2f} | {r['per_base']:.2f} | {r['per_qlora']:.2f} | "
            f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / qlora['peak_bytes']:.3f} |"
        )
    return lines + [
        "",
        "Step ratios are medians of the per-round ratios (the three steps of a round run back to back).",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, plus cuda when present)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (median)")
    parser.add_argument("--write", action="store_true", help="rewrite this benchmark's section of RESULTS.md")
    parser.add_argument("--peak-memory", choices=["base", "qlora", "sparse"], help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_memory:
        print(peak_memory(args.peak_memory, args.device, args.tokens))
        return
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [
        "## 4-bit sparse vs QLoRA (`benchmarks/qlora_bench.py`)",
        "",
        f"Command: `python benchmarks/qlora_bench.py --write --repeats {args.repeats}"
        f"{' --device ' + args.device if args.device else ''}`, run on {date.today()}.",
        "",
    ]
    for device in devices:
        shape = SHAPES[device]
        lines += [
            f"### {device.upper()}: {machine(device)}",
            "",
            f"{shape['blocks']} blocks of Linear4bit (NF4, double quantisation, bf16 compute) "
            f"{shape['hidden']}x{shape['hidden']}, {shape['hidden']}x{shape['intermediate']}, "
            f"{shape['intermediate']}x{shape['hidden']}; LoRA r={shape['lora_r']}, sparse adapter with the same "
            f"trainable count; ops backend: {ops.backend(device)}.",
            "",
        ]
        for tokens in shape["tokens"]:
            print(f"benchmarking {device}, {tokens} tokens ...", file=sys.stderr)
            lines += table(bench(device, tokens, args.repeats), tokens)
    publish(lines, args.write)


if __name__ == "__main__":
    main()
