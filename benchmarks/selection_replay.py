"""What layer groups cost selection, in training steps: one pass, whole passes per group, and block replay.

    python benchmarks/selection_replay.py            # 8-layer 512-wide Llama, reentrant checkpointing, CPU
    python benchmarks/selection_replay.py --write    # ... and rewrite this section of benchmarks/RESULTS.md

A Llama from a config (seeded random weights) with every linear layer of its blocks targeted, gradient checkpointing
as peft's QLoRA recipe turns it on (reentrant, ``enable_input_require_grads``), in training mode. ``select_mask``
(gradient salience) over the same salience batches three ways: all layers in one pass (``max_memory`` large), one
group per decoder block by block replay (``layers_per_pass=7``, the default path from three groups on), and the same
groups by whole passes (replay turned off), each repeated and timed as a median; the training step (forward,
backward, AdamW on the adapter) on a batch of the same shape gives the unit. The masks of the three must be
identical (the script stops otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date

import torch
from common import machine, publish, seeded_llama

SHAPE = {"hidden": 512, "intermediate": 1376, "layers": 8, "heads": 8, "kv_heads": 4, "vocab": 2048, "seq": 128}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build():
    from peft import get_peft_model

    from peft_sparse import SparseConfig

    base = seeded_llama(SHAPE, torch.float32)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    base.enable_input_require_grads()
    return get_peft_model(base, SparseConfig(target_modules=TARGETS, density=0.01, selection="gradient")).train()


def batches(count: int, batch: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, SHAPE["vocab"], (batch, SHAPE["seq"]), generator=generator) for _ in range(count)]
    return [{"input_ids": x, "labels": x} for x in ids]


def timed_selection(way: str, data: list[dict]) -> tuple[float, dict, object]:
    from peft_sparse import select_mask
    from peft_sparse.selection import passes
    from peft_sparse.tuner.lookup import sparse_layers

    model = build()
    kwargs = {"max_memory": 2**40} if way == "one pass" else {"layers_per_pass": 7}
    saved = passes.MIN_REPLAYED_GROUPS
    if way == "whole passes":
        passes.MIN_REPLAYED_GROUPS = 10**9
    try:
        start = time.perf_counter()
        report = select_mask(model, data, **kwargs)
        seconds = time.perf_counter() - start
    finally:
        passes.MIN_REPLAYED_GROUPS = saved
    chosen = {name: layer.sparse_indices["default"].clone() for name, layer in sparse_layers(model)}
    return seconds, chosen, report


def step_seconds(data: list[dict], repeats: int) -> float:
    model = build()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(**data[i % len(data)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=4, help="salience batches")
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each selection (median)")
    parser.add_argument("--write", action="store_true", help="rewrite this section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    data = batches(args.batches, args.batch)
    ways = ("one pass", "block replay", "whole passes")
    seconds = {way: [] for way in ways}
    reports, masks = {}, {}
    for _ in range(args.repeats):  # interleaved, so that a slow phase of the machine hits all three alike
        for way in ways:
            print(f"{way} ...", file=sys.stderr, flush=True)
            spent, masks[way], reports[way] = timed_selection(way, data)
            seconds[way].append(spent)
    for way in ways[1:]:
        differ = [name for name in masks[ways[0]] if not torch.equal(masks[ways[0]][name], masks[way][name])]
        if differ:
            raise SystemExit(f"{way} chose other entries than one pass in {differ[:3]}")
    step = step_seconds(data, 2 * args.batches)
    lines = [
        "## Selection in layer groups: block replay (`benchmarks/selection_replay.py`)",
        "",
        "Command: `python benchmarks/selection_replay.py"
        + (f" --batches {args.batches}" if args.batches != 4 else "")
        + (f" --batch {args.batch}" if args.batch != 4 else "")
        + (f" --repeats {args.repeats}" if args.repeats != 3 else "")
        + f" --write`, run on {date.today().isoformat()}, on {machine('cpu')}.",
        "",
        f"Llama from a config ({SHAPE['layers']} layers, hidden {SHAPE['hidden']}, intermediate "
        f"{SHAPE['intermediate']}), all seven projections of every block, reentrant checkpointing with "
        f"`enable_input_require_grads` (peft's QLoRA recipe), gradient salience over {args.batches} batches of "
        f"{args.batch} x {SHAPE['seq']} tokens; the three ways chose the same entries. Training step (forward, "
        f"backward, AdamW) on one such batch: {step * 1e3:.0f} ms (median).",
        "",
        "| way | groups | passes | selection (s, median) | training steps per salience batch |",
        "|---|---|---|---|---|",
    ]
    for way in ways:
        report = reports[way]
        groups = report.passes - 1 if report.replayed else report.passes
        median = statistics.median(seconds[way])
        lines.append(f"| {way} | {groups} | {report.passes} | {median:.2f} | {median / args.batches / step:.2f} |")
    lines += [
        "",
        "The memory model's figures (`memory_model.step_equivalents_per_batch`, in forwards' worth F: a frozen-base "
        "step under reentrant checkpointing is 3F, a salience pass also forms the dense weight gradients): one pass "
        "4/3 of a step per batch, block replay 7/3 (a recording pass without probes, then every block once with "
        "them), whole passes `(2G + 2) / 3` with the backward cut at each group's lowest block.",
        "",
    ]
    publish(lines, args.write)


if __name__ == "__main__":
    main()
