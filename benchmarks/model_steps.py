"""Full-model training steps: sparse vs LoRA / QLoRA vs peft SHiRA and Super-Tuning vs the frozen base, as ratios
measured in one run.

    python benchmarks/model_steps.py --device cuda --write    # a ~1.1B Llama (TinyLlama's shape), batch 8 x 1024
    python benchmarks/model_steps.py --device cpu             # the same script on a small Llama (a smoke run)

The model is a Llama built from a config with random weights (speed does not depend on the values), on two bases:
``bf16`` (every weight bf16) and ``nf4`` (every decoder linear a bitsandbytes NF4 ``Linear4bit`` with double
quantisation and bf16 compute, QLoRA's setting; float32 compute on the CPU). On each base, every method has LoRA
r's trainable-parameter count on all seven projections:

* ``base``: no adapter, the backward runs down to the input embeddings only (the cost every adapter pays);
* ``lora``: peft LoRA of rank r (QLoRA on the nf4 base);
* ``sparse``: a peft-sparse adapter with exactly LoRA's count, random mask (the entries' positions do not change
  the cost, their number does);
* ``shira``: peft SHiRA of rank r (r * (in + out) random entries per layer, LoRA's count);
* ``supertuning``: peft Super-Tuning (magnitude entries) with the sparsity that gives LoRA's count.

A method peft cannot build or run on a base (Super-Tuning on 4-bit layers) is reported as such. Each step is forward, backward and
AdamW on one fixed batch of token ids. The methods of one base are timed in rounds that run one step of each back to
back, after one warm-up step each; ratios are medians of the per-round ratios. Peak memory comes from a subprocess per method (peak allocated
on the GPU, VmHWM on the CPU). The speed goals are checked at the end: nf4 step <= 0.75x QLoRA, bf16 step
<= 0.85x LoRA, nf4 peak memory <= QLoRA's + 18 bytes per trainable entry.
"""

from __future__ import annotations

import argparse
from datetime import date

import torch
from common import (
    TARGETS,
    causal_lm_step,
    compare_steps,
    machine,
    publish,
    seeded_llama,
    steps_peak_memory,
)

SHAPES = {
    # TinyLlama-1.1B's shape: 22 layers, hidden 2048, intermediate 5632, 32 heads, 4 key/value heads
    "cuda": {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4, "vocab": 32000,
             "batch": 8, "seq": 1024, "lora_r": 16},
    "cpu": {"hidden": 256, "intermediate": 688, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 1024,
            "batch": 2, "seq": 64, "lora_r": 8},
}  # fmt: skip
METHODS = ("base", "lora", "sparse", "shira", "supertuning")


def compute_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def llama(device: str, base: str):
    """The random Llama of ``SHAPES[device]`` on ``device``: bf16 weights, or its decoder linears as NF4."""
    model = seeded_llama(SHAPES[device], compute_dtype(device))
    if base == "nf4":
        quantise_decoder_linears(model, compute_dtype(device))
    return model.to(device)


def quantise_decoder_linears(model, dtype: torch.dtype) -> None:
    """Every ``nn.Linear`` of the decoder layers becomes a bitsandbytes NF4 ``Linear4bit`` (double quantisation)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, dense in list(parent.named_children()):
                if not isinstance(dense, torch.nn.Linear):
                    continue
                quantised = bnb.nn.Linear4bit(
                    dense.in_features,
                    dense.out_features,
                    bias=dense.bias is not None,
                    compute_dtype=dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                quantised.weight = bnb.nn.Params4bit(
                    dense.weight.data,
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                    module=quantised,
                )
                setattr(parent, name, quantised)


def adapter_config(method: str, model, lora_r: int):
    from peft import LoraConfig, ShiraConfig, SupertuningConfig

    from peft_sparse import SparseConfig, lora_equivalent_budget
    from peft_sparse.tuner.budget import targeted_linear_shapes

    budget = lora_equivalent_budget(model, r=lora_r, target_modules=TARGETS)
    if method == "lora":
        return LoraConfig(target_modules=TARGETS, r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0)
    if method == "sparse":
        return SparseConfig(target_modules=TARGETS, num_tunable_weights=budget, selection="random")
    if method == "shira":
        return ShiraConfig(target_modules=TARGETS, r=lora_r)
    total = sum(rows * cols for rows, cols in targeted_linear_shapes(model, TARGETS))
    return SupertuningConfig(target_modules=TARGETS, sparsity=1 - budget / total)


def build_step(method: str, device: str, base: str):
    """(step, trainable count) for ``method`` on ``base``; raises what peft raises where it cannot build it."""
    from peft import get_peft_model

    import peft_sparse  # noqa: F401  (registers PeftType.SPARSE)

    shape = SHAPES[device]
    model = llama(device, base)
    if method == "base":
        model.requires_grad_(False)
    else:
        model = get_peft_model(model, adapter_config(method, model, shape["lora_r"]))
    model.train()
    return causal_lm_step(model, shape["vocab"], shape["batch"], shape["seq"], device, lr=1e-5)


def peak_memory(method: str, device: str, base: str) -> int:
    return steps_peak_memory(build_step(method, device, base)[0], device, steps=2)


def bench(device: str, base: str, repeats: int) -> dict:
    """Every method of ``METHODS`` on ``base``; one peft cannot build or run on it is recorded as unsupported."""
    return compare_steps(
        __file__,
        lambda method: build_step(method, device, base),
        tuple(METHODS),
        device,
        repeats,
        references=("base", "lora"),
        peak_memory_args=("--base", base),
        warmup_rounds=0,  # the first step of each, run by compare_steps to find the unsupported, is the warm-up
        unsupported=(ValueError, TypeError, NotImplementedError, RuntimeError),
    )


NAMES = {
    "base": "frozen base (limit)",
    "lora": "LoRA",
    "sparse": "peft-sparse",
    "shira": "peft SHiRA",
    "supertuning": "peft Super-Tuning",
}


def table(results: dict, device: str, base: str) -> list[str]:
    shape = SHAPES[device]
    lora_name = "QLoRA" if base == "nf4" else "LoRA"
    lines = [
        f"**{base} base, LoRA r={shape['lora_r']}'s count**",
        "",
        f"| | trainable | step (ms, median) | step / frozen base | step / {lora_name} | peak memory (MiB) | "
        f"memory / {lora_name} |",
        "|---|---|---|---|---|---|---|",
    ]
    lora = results["lora"]
    for method in METHODS:
        r = results[method]
        name = NAMES[method] if method != "lora" else f"{lora_name} r={shape['lora_r']}"
        if "unsupported" in r:
            lines.append(f"| {name} | peft cannot run it on this base: {r['unsupported']} | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['trainable']:,} | {r['step_ms']:.1f} | {r['per_base']:.2f} | {r['per_lora']:.2f} | "
            f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / lora['peak_bytes']:.3f} |"
        )
    return lines + ["", "Step ratios are medians of the per-round ratios (a round runs one step of each method).", ""]


def goals(results: dict) -> list[str]:
    """The speed goals, checked on this run's figures."""
    lines = ["| goal | measured | met |", "|---|---|---|"]
    bf16, nf4 = results.get("bf16"), results.get("nf4")
    if bf16 is not None:
        ratio = bf16["sparse"]["per_lora"]
        lines.append(f"| bf16 step <= 0.85x LoRA | {ratio:.2f}x | {'yes' if ratio <= 0.85 else 'no'} |")
    if nf4 is not None:
        ratio = nf4["sparse"]["per_lora"]
        lines.append(f"| nf4 step <= 0.75x QLoRA | {ratio:.2f}x | {'yes' if ratio <= 0.75 else 'no'} |")
        sparse, qlora = nf4["sparse"], nf4["lora"]
        allowed = qlora["peak_bytes"] + 18 * sparse["trainable"]
        lines.append(
            f"| nf4 peak memory <= QLoRA + 18 B per trainable entry ({allowed / 2**20:.0f} MiB) | "
            f"{sparse['peak_bytes'] / 2**20:.0f} MiB | {'yes' if sparse['peak_bytes'] <= allowed else 'no'} |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bases", default="bf16,nf4", help="comma-separated: bf16, nf4")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (median)")
    parser.add_argument("--write", action="store_true", help="rewrite this section of benchmarks/RESULTS.md")
    parser.add_argument("--peak-memory", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--base", default="bf16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_memory:
        print(peak_memory(args.peak_memory, args.device, args.base))
        return
    shape = SHAPES[args.device]
    results = {base: bench(args.device, base, args.repeats) for base in args.bases.split(",")}
    lines = [
        "## Full-model training steps (`benchmarks/model_steps.py`)",
        "",
        f"Command: `python benchmarks/model_steps.py --device {args.device} --repeats {args.repeats}"
        + (f" --bases {args.bases}" if args.bases != "bf16,nf4" else "")
        + f" --write`, run on {date.today().isoformat()}, on {machine(args.device)}.",
        "",
        f"Llama from a config (random weights): {shape['layers']} layers, hidden {shape['hidden']}, intermediate "
        f"{shape['intermediate']}, {shape['heads']} heads ({shape['kv_heads']} key/value), vocabulary "
        f"{shape['vocab']}; batch {shape['batch']} x {shape['seq']} tokens; compute dtype "
        f"{str(compute_dtype(args.device)).removeprefix('torch.')}; all seven projections targeted; AdamW.",
        "",
    ]
    for base, result in results.items():
        lines += table(result, args.device, base)
    lines += goals(results)
    publish(lines, args.write)


if __name__ == "__main__":
    main()
