"""Speed of the peft-sparse ops and of a sparse training step, as ratios measured in one run.

    python benchmarks/ops_bench.py                 # CPU always; GPU too when one is present
    python benchmarks/ops_bench.py --write         # ... and rewrite benchmarks/RESULTS.md

Each op is timed against its byte floor (bytes it must move at the bandwidth a plain copy reaches on the same
device, in the same run) and against the naive PyTorch composition it replaces:

* ``sddmm_gather`` vs the dense weight gradient ``grad_output.T @ input`` followed by a gather, vs the same product
  taken in row blocks with each block's entries gathered (``PEFT_SPARSE_SDDMM=dense``), and vs the pure-PyTorch
  reference;
* ``dequant_scatter`` vs ``bitsandbytes.functional.dequantize_4bit`` followed by ``index_add_`` (and the reference);
* ``scatter_add`` (the merged weight of the forward: copy + scatter) vs the copy alone;
* a layer's top-k with the seeded tie rule (``select_top_k``, what the per-layer budget and SpIEL's regrowth use) vs
  ``torch.topk`` followed by sorting its indices, and vs the reference top-k.

Then one training step (forward + backward + AdamW) of a 4-layer, 512-wide Llama: sparse adapter vs peft LoRA at
the same trainable-parameter count vs the frozen base (backward to the input embeddings only: the limit both
adapters pay for). The three are timed in one process, interleaved step by step, so that drift in the machine's
speed affects them alike; each one's peak memory (max RSS on CPU, peak allocated on GPU) comes from a subprocess
running it alone. All timings are medians over repeated runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date

import torch
from common import (
    TARGETS,
    causal_lm_step,
    compare_steps,
    machine,
    median_time,
    publish,
    seeded_llama,
    steps_peak_memory,
)

from peft_sparse import ops
from peft_sparse.ops import reference
from peft_sparse.ops.dense_rows import sddmm_gather_dense_rows
from peft_sparse.selection.topk import reference_top_k, select_top_k

# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes per second of a plain device copy (read + write), the yardstick for byte floors."""
    numel = (256 if device == "cuda" else 64) * 2**20 // 4
    source = torch.randn(numel, device=device)
    target = torch.empty_like(source)
    seconds = median_time(lambda: target.copy_(source), device, repeats)
    return 2 * source.numel() * 4 / seconds


# ---------------------------------------------------------------------------------------------------------------
# op benchmarks
# ---------------------------------------------------------------------------------------------------------------


def _sorted_indices(numel: int, k: int, device: str, generator: torch.Generator) -> torch.Tensor:
    from peft_sparse.tuner.indices import index_dtype, random_indices

    return random_indices(numel, k, generator).to(device=device, dtype=index_dtype(numel))


def bench_sddmm(device, dtype, num_tokens, out_features, in_features, density, bandwidth, repeats):
    gen = torch.Generator().manual_seed(0)
    grad_output = torch.randn(num_tokens, out_features, generator=gen).to(device=device, dtype=dtype)
    input = torch.randn(num_tokens, in_features, generator=gen).to(device=device, dtype=dtype)
    k = round(density * out_features * in_features)
    indices = _sorted_indices(out_features * in_features, k, device, gen)
    ours = median_time(lambda: ops.sddmm_gather(grad_output, input, indices, in_features), device, repeats)
    flat = indices.long()
    dense = median_time(lambda: (grad_output.t() @ input).view(-1)[flat].float(), device, repeats)
    rows = median_time(lambda: sddmm_gather_dense_rows(grad_output, input, indices, in_features), device, repeats)
    ref = median_time(
        lambda: reference.sddmm_gather(grad_output, input, indices, in_features), device, max(3, repeats // 3)
    )
    floor_bytes = num_tokens * (in_features + out_features) * grad_output.element_size() + k * (
        indices.element_size() + 4
    )
    return {
        "op": "sddmm_gather",
        "shape": f"N={num_tokens}, {out_features}x{in_features}, {dtype_name(dtype)}, density {density:g} (k={k})",
        "ours_ms": ours * 1e3,
        "baselines_ms": {
            "dense grad.T@x + gather": dense * 1e3,
            "dense row blocks (PEFT_SPARSE_SDDMM=dense)": rows * 1e3,
            "reference": ref * 1e3,
        },
        "floor_ms": floor_bytes / bandwidth * 1e3,
    }


def bench_dequant(device, dtype, out_features, in_features, density, bandwidth, repeats):
    import bitsandbytes.functional as bnb_functional

    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(out_features, in_features, generator=gen).to(device)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    state.dtype = dtype
    numel = out_features * in_features
    k = round(density * numel)
    indices = _sorted_indices(numel, k, device, gen)
    values = torch.randn(k, generator=gen).to(device)
    ours = median_time(lambda: ops.dequant_scatter_4bit(packed, state, indices, values), device, repeats)
    flat = indices.long()

    def naive():
        dense = bnb_functional.dequantize_4bit(packed, state).clone()
        dense.view(-1).index_add_(0, flat, values.to(dtype))
        return dense

    base = median_time(naive, device, repeats)
    ref = median_time(
        lambda: reference.dequant_scatter(
            packed,
            state.absmax,
            state.code,
            64,
            state.shape,
            dtype,
            indices,
            values,
            state.state2.absmax,
            state.state2.code,
            state.state2.blocksize,
            float(state.offset),
        ),
        device,
        max(3, repeats // 3),
    )
    floor_bytes = numel // 2 + -(-numel // 64) + numel * torch.empty((), dtype=dtype).element_size() + k * 8
    return {
        "op": "dequant_scatter",
        "shape": f"{out_features}x{in_features} NF4 double-quant -> {dtype_name(dtype)}, density {density:g}",
        "ours_ms": ours * 1e3,
        "baselines_ms": {"bnb dequantize_4bit + clone + index_add_": base * 1e3, "reference": ref * 1e3},
        "floor_ms": floor_bytes / bandwidth * 1e3,
    }


def bench_scatter(device, dtype, out_features, in_features, density, bandwidth, repeats):
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(out_features, in_features, generator=gen).to(device=device, dtype=dtype)
    k = round(density * out_features * in_features)
    indices = _sorted_indices(out_features * in_features, k, device, gen)
    values = torch.randn(k, generator=gen).to(device)
    ours = median_time(lambda: ops.merged_weight(weight, indices, values, False, dtype), device, repeats)
    copy = median_time(lambda: weight.clone(), device, repeats)
    ref = median_time(lambda: reference.scatter_add(weight.clone(), indices, values), device, repeats)
    floor_bytes = 2 * weight.numel() * weight.element_size() + k * (indices.element_size() + 4)
    return {
        "op": "merged weight (copy + scatter_add)",
        "shape": f"{out_features}x{in_features}, {dtype_name(dtype)}, density {density:g}",
        "ours_ms": ours * 1e3,
        "baselines_ms": {"copy alone": copy * 1e3, "copy + reference scatter": ref * 1e3},
        "floor_ms": floor_bytes / bandwidth * 1e3,
    }


def bench_top_k(device, out_features, in_features, density, bandwidth, repeats):
    """A layer's top-k as the per-layer budget and SpIEL's regrowth take it (seeded tie rule, sorted int64 positions)
    vs ``torch.topk`` + sorting its indices (no tie rule) and vs the reference (int64 keys, bisection)."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(out_features, in_features, generator=gen).square().to(device)
    k = round(density * out_features * in_features)
    ties = torch.Generator().manual_seed(0)
    ours = median_time(lambda: select_top_k([scores], k, [ties]), device, repeats)
    flat = scores.view(-1)
    plain = median_time(lambda: torch.topk(flat, k, sorted=False).indices.sort(), device, repeats)
    ref = median_time(lambda: reference_top_k([scores], k, [ties]), device, max(3, repeats // 3))
    return {
        "op": "layer top-k (select_top_k)",
        "shape": f"{out_features}x{in_features}, float32, k={k}",
        "ours_ms": ours * 1e3,
        "baselines_ms": {"torch.topk + sort": plain * 1e3, "reference (bisection)": ref * 1e3},
        "floor_ms": scores.numel() * 4 / bandwidth * 1e3,
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------------------------
# training step (one configuration per subprocess)
# ---------------------------------------------------------------------------------------------------------------

STEP_CONFIG = {
    "hidden": 512,
    "layers": 4,
    "heads": 8,
    "intermediate": 1376,
    "vocab": 2048,
    "batch": 8,
    "seq": 128,
    "lora_r": 8,
}


def build_step(method: str, device: str, dtype: torch.dtype):
    """A model with the given adapter and a function running one training step on it; returns (step, trainable)."""
    from peft import LoraConfig, get_peft_model

    from peft_sparse import SparseConfig, lora_equivalent_budget  # importing peft_sparse registers PeftType.SPARSE

    c = STEP_CONFIG
    model = seeded_llama(c, dtype).to(device)
    budget = lora_equivalent_budget(model, r=c["lora_r"], target_modules=TARGETS)
    if method == "sparse":
        model = get_peft_model(model, SparseConfig(target_modules=TARGETS, num_tunable_weights=budget))
    elif method == "lora":
        model = get_peft_model(model, LoraConfig(target_modules=TARGETS, r=c["lora_r"], lora_alpha=16))
    else:
        model.requires_grad_(False)
    return causal_lm_step(model, c["vocab"], c["batch"], c["seq"], device, lr=1e-4)


def peak_memory(method: str, device: str, dtype_str: str) -> int:
    """Peak memory of a few steps of one configuration alone (max RSS on CPU, peak allocated on GPU)."""
    return steps_peak_memory(build_step(method, device, getattr(torch, dtype_str))[0], device)


def bench_steps(device: str, dtype_str: str, repeats: int) -> dict:
    """Step times of the three configurations, interleaved round by round; peak memory of each from a subprocess."""
    results = compare_steps(
        __file__,
        lambda method: build_step(method, device, getattr(torch, dtype_str)),
        ("base", "lora", "sparse"),
        device,
        repeats,
        references=("base", "lora"),
        peak_memory_args=("--dtype", dtype_str),
        warmup_rounds=3,
    )
    for record in results.values():
        record["backend"] = ops.backend(device)
    return results


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------


def op_table(rows: list[dict]) -> list[str]:
    lines = [
        "| op | shape | ours (ms) | floor (ms) | floor / ours | baseline (ms) | baseline / ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for i, (name, ms) in enumerate(row["baselines_ms"].items()):
            lead = (
                [
                    row["op"],
                    row["shape"],
                    f"{row['ours_ms']:.3f}",
                    f"{row['floor_ms']:.3f}",
                    f"{row['floor_ms'] / row['ours_ms']:.0%}",
                ]
                if i == 0
                else ["", "", "", "", ""]
            )
            lines.append("| " + " | ".join(lead + [f"{name}: {ms:.3f}", f"{ms / row['ours_ms']:.2f}x"]) + " |")
    return lines


def step_table(results: dict, label: str) -> list[str]:
    base, lora, sparse = results["base"], results["lora"], results["sparse"]
    lines = [
        f"**{label}**",
        "",
        "| | trainable | step (ms, median) | step / frozen base | step / LoRA | peak memory (MiB) | memory / LoRA |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in (("frozen base (limit)", base), ("LoRA r=8", lora), (f"sparse ({sparse['backend']})", sparse)):
        lines.append(
            f"| {name} | {r['trainable']:,} | {r['step_ms']:.1f} | {r['per_base']:.2f} | {r['per_lora']:.2f} | "
            f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / lora['peak_bytes']:.3f} |"
        )
    lines += [
        "",
        "Step ratios are medians of the per-round ratios (the three steps of a round run back to back).",
        f"sparse / LoRA step time: **{sparse['per_lora']:.2f}**; sparse / frozen base: **{sparse['per_base']:.2f}**",
        "",
    ]
    return lines


def run_device(device: str, repeats: int) -> list[str]:
    bandwidth = copy_bandwidth(device, repeats)
    lines = [
        f"### {device.upper()}: {machine(device)}",
        "",
        f"Copy bandwidth measured in this run: {bandwidth / 1e9:.1f} GB/s (read + write); floors are bytes / "
        "that bandwidth.",
        "",
    ]
    if device == "cuda":
        dtype, shapes = torch.bfloat16, [(4096, 4096), (11008, 4096), (4096, 11008)]
        tokens, density = [2048, 8192], 0.005
        top_k_shapes = [(14336, 4096, 8), (28672, 8192, 8)]  # Llama-3-8B's and -70B's MLP projections
    else:
        dtype, shapes = torch.float32, [(512, 512), (1024, 1024)]
        tokens, density = [1024], 0.01
        top_k_shapes = [(1536, 576, 8), (5632, 2048, 8)]  # SmolLM2-135M's and TinyLlama-1.1B's MLP projections
    rows = []
    for out_features, in_features in shapes:
        for num_tokens in tokens:
            rows.append(bench_sddmm(device, dtype, num_tokens, out_features, in_features, density, bandwidth, repeats))
    for out_features, in_features in shapes:
        for out_dtype in (torch.bfloat16,) + ((torch.float32,) if device == "cpu" else ()):
            rows.append(bench_dequant(device, out_dtype, out_features, in_features, density, bandwidth, repeats))
        rows.append(bench_scatter(device, dtype, out_features, in_features, density, bandwidth, repeats))
    for out_features, in_features, r in top_k_shapes:  # real layers at LoRA r's count
        top_k_density = r * (out_features + in_features) / (out_features * in_features)
        rows.append(bench_top_k(device, out_features, in_features, top_k_density, bandwidth, repeats))
    lines += op_table(rows) + [""]
    c = STEP_CONFIG
    lines += [
        f"Training step: Llama, {c['layers']} layers, hidden {c['hidden']}, intermediate {c['intermediate']}, "
        f"batch {c['batch']} x {c['seq']} tokens, all seven projections targeted, AdamW; sparse budget = "
        f"LoRA r={c['lora_r']} parameter count.",
        "",
    ]
    step_dtype = "bfloat16" if device == "cuda" else "float32"
    lines += step_table(bench_steps(device, step_dtype, repeats), f"{step_dtype}, compiled kernels")
    if device == "cpu":
        os.environ[ops.FORCE_REFERENCE_ENV] = "1"
        try:
            lines += step_table(
                bench_steps(device, step_dtype, repeats),
                f"{step_dtype}, pure-PyTorch reference ops (PEFT_SPARSE_FORCE_REFERENCE=1), for contrast",
            )
        finally:
            del os.environ[ops.FORCE_REFERENCE_ENV]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the op section of benchmarks/RESULTS.md")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per measurement (median)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, plus cuda when present)")
    parser.add_argument("--peak-memory", choices=["base", "lora", "sparse"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_memory:
        print(peak_memory(args.peak_memory, args.device, args.dtype))
        return
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [
        "## Ops and training step (`benchmarks/ops_bench.py`)",
        "",
        f"Command: `python benchmarks/ops_bench.py --write --repeats {args.repeats}`, run on {date.today()}.",
        "",
    ]
    for device in devices:
        print(f"benchmarking on {device} ...", file=sys.stderr)
        lines += run_device(device, args.repeats)
    if not torch.cuda.is_available():
        lines += [
            "This run had no GPU. GPU figures, measured on a lent GPU machine with `benchmarks/gpu_check.sh`, are "
            "in the GPU section of this file.",
            "",
        ]
    publish(lines, args.write)


if __name__ == "__main__":
    main()
