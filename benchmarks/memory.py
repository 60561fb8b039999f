"""Memory of 4-bit training: does a sparse adapter fit where QLoRA fits? Measured on a TinyLlama-1.1B-shaped Llama,
and predicted per component for Llama-3-8B and Llama-3-70B.

    python benchmarks/memory.py                     # measure the 1.1B (CPU: about 30 minutes on 2 cores)
    python benchmarks/memory.py --layers 2          # the same width with 2 layers: a quick look (a few minutes)
    python benchmarks/memory.py --predict-only      # the memory model's table alone
    python benchmarks/memory.py --write             # ... and rewrite this section of benchmarks/RESULTS.md
    python benchmarks/memory.py --save-records r.json   # keep the raw measurements (--records r.json: report them)

The model is a Llama built from a config with seeded random weights (TinyLlama-1.1B's shape: hidden 2048,
intermediate 5632, 22 layers, 32 heads, 4 key/value heads, vocabulary 32000), saved in bf16 to a temporary folder and
loaded back as QLoRA loads a model: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4, double
quantisation, bf16 compute))``, then ``prepare_model_for_kbit_training`` with reentrant gradient checkpointing (which
also casts the unquantised embeddings, norms and ``lm_head`` to fp32, so the residual stream runs in fp32). One
batch of 1 x 512 random token ids. Each method runs in a subprocess of its own, so its peaks are its own:

* ``base``: the frozen 4-bit model, forward + backward down to the input embeddings (the floor every adapter pays);
* ``qlora``: peft LoRA r=16 on all linear layers, AdamW steps;
* ``sparse``: ``SparseConfig(target_modules="all-linear", num_tunable_weights=<QLoRA r=16's count>,
  selection="gradient")``, ``select_mask`` over 2 batches (its own peak and time), then the same AdamW steps.

Memory is the process's peak resident set (VmHWM, reset between phases through ``/proc/self/clear_refs``) on the CPU
and ``torch.cuda.max_memory_allocated`` on a GPU, reported above the loaded model. On the CPU the process also holds
the torch / Python runtime, measured in each subprocess after its imports and before the model is built; and the
subprocesses run with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``, unless
``--default-malloc``), so that a freed tensor leaves the resident set as a GPU allocator's freed block leaves
"allocated" (glibc's default raises the threshold as large blocks are freed and then keeps freed memory resident:
about 100 MiB more at the peak here, which would be allocator behaviour, not tensors).

The memory model (``memory_model.py``, :func:`memory_model.predict`) adds up, per component, what a Llama config costs in NF4 with gradient
checkpointing at batch b x s: the base weights, the adapter state, the activations checkpointing keeps and the one
block it recomputes, the fp32 logits and loss, the per-layer dequantised weight, and selection's accumulators and
candidate set. It is checked against the 1.1B measurement (within 10 %), then predicts 8B and 70B. The goals
checked: sparse peak <= 1.05 x QLoRA's peak + 18 bytes per trainable entry, and selection's extra memory <= the
training step's extra memory.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import torch
from common import causal_lm_step, machine, publish, seeded_llama, steps_peak_memory, sync
from memory_model import (
    BYTES_PER_ENTRY,
    GPUS,
    METHODS,
    NAMES,
    SHAPES,
    SLACK,
    GiB,
    MiB,
    linear_shapes,
    one_pass_selection,
    predict,
)

from peft_sparse._memory import process_status_kib, reset_peak_memory

HEADING = "## Memory: fits where QLoRA fits"

MMAP_THRESHOLD = "65536"


# ---------------------------------------------------------------------------------------------------------------
# measurement (one method per subprocess)
# ---------------------------------------------------------------------------------------------------------------


def current_memory(device: str) -> int:
    """What the process holds now: allocated CUDA memory, or the resident set (``VmRSS``) on a CPU."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return process_status_kib("VmRSS") * 1024


def reset_peak(device: str) -> None:
    """Start a new peak from what the process holds now (on a CPU, freed heap memory handed back to the system
    first, so that the restarted ``VmHWM`` counts tensors, not the allocator's cache)."""
    if device == "cuda":
        torch.cuda.synchronize()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    reset_peak_memory(device)


def load_nf4(folder: str, device: str):
    """QLoRA's loading: NF4 from_pretrained, then prepare_model_for_kbit_training with reentrant checkpointing."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=quantization,
        dtype=torch.bfloat16,
        device_map={"": 0} if device == "cuda" else None,
    )
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    return model


def salience_batches(vocab: int, batch: int, seq: int, count: int, device: str) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, vocab, (batch, seq), generator=generator).to(device) for _ in range(count)]
    return [{"input_ids": x, "labels": x} for x in ids]


def select(model, batches, selection_memory: int | None, layers_per_pass: int | None):
    """select_mask over the batches: with ``max_memory`` where select_mask has it (``None``: its default budget),
    else (before that existed) ``layers_per_pass``. Returns (report, the call as text)."""
    from peft_sparse import select_mask

    kwargs = {"num_batches": len(batches), "layers_per_pass": layers_per_pass}
    if "max_memory" in inspect.signature(select_mask).parameters:
        kwargs["max_memory"] = selection_memory
        call = f"max_memory={selection_memory}"
    else:
        call = f"layers_per_pass={layers_per_pass} (this select_mask has no max_memory)"
    return select_mask(model, batches, **kwargs), call


def untracked_tensors(model) -> list[str]:
    """Tensors of 1 MiB or more alive between training steps that are neither the model's parameters, buffers or
    gradients nor an optimizer's state: where a dense per-weight buffer (a kept dequantised weight, a merged copy,
    a whole-model gradient) would show up."""
    known = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        known.add(id(tensor))
        if tensor.grad is not None:
            known.add(id(tensor.grad))
    found = []
    with warnings.catch_warnings():  # isinstance on every live object touches deprecated aliases
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        for obj in objects:
            if isinstance(obj, torch.optim.Optimizer):
                known.update(id(v) for state in obj.state.values() for v in state.values() if torch.is_tensor(v))
        for obj in objects:
            if torch.is_tensor(obj) and id(obj) not in known and obj.numel() * obj.element_size() >= MiB:
                found.append(f"{tuple(obj.shape)} {str(obj.dtype).removeprefix('torch.')}")
    return found


def cap_free_memory(cap: int, device: str) -> None:
    """Make selection see a device (and, on a CPU, a host) of ``cap`` bytes in all: what it reads as free is ``cap``
    less what the process holds now. A machine where only the bound is free, simulated on a roomy one."""
    from peft_sparse.selection import passes, select

    real = select.free_memory_bytes

    def free(target) -> int | None:
        seen = real(target)
        capped = max(0, cap - current_memory(device))
        return capped if seen is None else min(seen, capped)

    select.free_memory_bytes = passes.free_memory_bytes = free


def measure(args) -> dict:
    """One method alone: runtime, loaded model, (selection,) training steps. Printed as one JSON line."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import peft_sparse  # noqa: F401  (registers PeftType.SPARSE)

    device, method = args.device, args.measure
    vocab = SHAPES["TinyLlama-1.1B"]["vocab"]
    record = {"method": method, "runtime": current_memory(device)}
    model = load_nf4(args.model_dir, device)
    reset_peak(device)
    record["loaded"] = current_memory(device)
    if method != "base":
        from peft import LoraConfig, get_peft_model

        from peft_sparse import SparseConfig, lora_equivalent_budget

        budget = lora_equivalent_budget(model, r=args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
        if method == "qlora":
            config = LoraConfig(
                r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear",
                task_type="CAUSAL_LM",
            )  # fmt: skip
        else:
            config = SparseConfig(
                target_modules="all-linear", num_tunable_weights=budget, selection="gradient", task_type="CAUSAL_LM"
            )
        model = get_peft_model(model, config)
    if method == "sparse" and args.free_cap is not None:
        cap_free_memory(args.free_cap, device)
    if method == "sparse":
        batches = salience_batches(vocab, args.batch, args.seq, args.salience_batches, device)
        reset_peak(device)
        start = time.perf_counter()
        done = {}

        def run():
            done["report"], done["call"] = select(model, batches, args.selection_memory, args.layers_per_pass)

        record["selection_peak"] = steps_peak_memory(run, device, steps=1)
        record["selection_seconds"] = time.perf_counter() - start
        report = done["report"]
        record["selection_call"] = done["call"]
        record["selection_report_extra"] = report.extra_memory_bytes
        record["selection_report_budget"] = getattr(report, "max_memory", None)
        record["selection_passes"] = getattr(report, "passes", None)
        if record["selection_passes"] is None:  # a select_mask without `passes`: one per group of layers
            count = len(report.per_layer)
            record["selection_passes"] = math.ceil(count / (args.layers_per_pass or count))
        record["selection_batches"] = report.num_batches
        record["selection_replay"] = {
            "replayed": getattr(report, "replayed", False),
            "bytes": getattr(report, "replay_bytes", 0),
            "recordings": getattr(report, "replay_recordings", 0),
        }
        record["selected"] = report.total
        del batches, done, report
        reset_peak(device)
        record["after_selection"] = current_memory(device)
    step, trainable = causal_lm_step(model, vocab, args.batch, args.seq, device, lr=1e-4)
    record["trainable"] = trainable
    times = []

    def timed_step():
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
        print(f"  {method} step {len(times)}: {times[-1]:.1f} s", file=sys.stderr, flush=True)

    reset_peak(device)
    record["step_peak"] = steps_peak_memory(timed_step, device, steps=args.steps)
    record["step_seconds"] = times
    record["untracked"] = untracked_tensors(model)
    return record


def run_method(method: str, args, model_dir: str) -> dict:
    command = [
        sys.executable, __file__, "--measure", method, "--model-dir", model_dir, "--device", args.device,
        "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps), "--lora-r", str(args.lora_r),
        "--salience-batches", str(args.salience_batches),
    ]  # fmt: skip
    if args.selection_memory is not None:
        command += ["--selection-memory", str(args.selection_memory)]
    if args.layers_per_pass is not None:
        command += ["--layers-per-pass", str(args.layers_per_pass)]
    if args.free_cap is not None and method == "sparse":
        command += ["--free-cap", str(args.free_cap)]
    env = dict(os.environ)
    if not args.default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    print(f"measuring {method} ...", file=sys.stderr, flush=True)
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------


def mb(value: float) -> str:
    return f"{value / MiB:,.0f}"


def gb(value: float) -> str:
    return f"{value / GiB:,.2f}"


def measured_table(results: dict) -> list[str]:
    qlora_peak = results["qlora"]["step_peak"]
    qlora_extra = qlora_peak - results["qlora"]["loaded"]
    lines = [
        "| | trainable | runtime (MiB) | model (MiB) | peak (MiB) | peak / QLoRA's | peak above loaded model (MiB) | "
        "above loaded / QLoRA's | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        r = results[method]
        extra = r["step_peak"] - r["loaded"]
        lines.append(
            f"| {NAMES[method]}: training steps | {r['trainable']:,} | {mb(r['runtime'])} | "
            f"{mb(r['loaded'] - r['runtime'])} | {mb(r['step_peak'])} | {r['step_peak'] / qlora_peak:.3f} | "
            f"{mb(extra)} | {extra / qlora_extra:.2f} | "
            f"{statistics.median(r['step_seconds']):.1f} per step (median) |"
        )
    s = results["sparse"]
    step = statistics.median(s["step_seconds"])
    extra = s["selection_peak"] - s["loaded"]
    lines += [
        f"| sparse: selection, `select_mask({s['selection_call']})` | {s['selected']:,} | {mb(s['runtime'])} | "
        f"{mb(s['loaded'] - s['runtime'])} | {mb(s['selection_peak'])} | {s['selection_peak'] / qlora_peak:.3f} | "
        f"{mb(extra)} | {extra / qlora_extra:.2f} | "
        f"{s['selection_seconds']:.0f} = {s['selection_seconds'] / step:.1f} sparse steps "
        f"({s['selection_passes']} passes x {s['selection_batches']} batches) |",
        "",
        (
            f"Selection saw a machine of {mb(s['free_cap'])} MiB in all (`--cap-at-bound`: what it read as free was "
            "that less what the process held). "
            if s.get("free_cap")
            else ""
        )
        + f"Selection: {s['selection_passes']} pass(es) over {s['selection_batches']} batches"
        + (
            f" (block replay: {s['selection_replay']['recordings']} recording round(s), boundaries "
            f"{mb(s['selection_replay']['bytes'])} MiB at most)"
            if s.get("selection_replay", {}).get("replayed")
            else ""
        )
        + "; "
        f"`SelectionReport.extra_memory_bytes` = {mb(s['selection_report_extra'])} MiB"
        + (
            f" (budget `max_memory` = {mb(s['selection_report_budget'])} MiB)"
            if s.get("selection_report_budget") is not None
            else ""
        )
        + f"; held after selection, before training: {mb(s['after_selection'] - s['loaded'])} MiB above the loaded "
        "model (the adapter's values and indices, 8 B per entry, and what the runtime keeps after its first backward).",
        "",
    ]
    return lines


def goals(results: dict) -> list[str]:
    qlora, sparse = results["qlora"], results["sparse"]
    allowed = SLACK * qlora["step_peak"] + BYTES_PER_ENTRY * sparse["trainable"]
    step_extra = sparse["step_peak"] - sparse["loaded"]
    selection_extra = sparse["selection_peak"] - sparse["loaded"]
    run_peak = max(sparse["step_peak"], sparse["selection_peak"])
    return [
        "| goal | measured | met |",
        "|---|---|---|",
        f"| sparse step peak <= {SLACK} x QLoRA's + {BYTES_PER_ENTRY} B x {sparse['trainable']:,} entries "
        f"({mb(allowed)} MiB) | {mb(sparse['step_peak'])} MiB | "
        f"{'PASS' if sparse['step_peak'] <= allowed else 'FAIL'} |",
        f"| selection's extra memory <= the sparse training step's extra memory ({mb(step_extra)} MiB) | "
        f"{mb(selection_extra)} MiB | {'PASS' if selection_extra <= step_extra else 'FAIL'} |",
        f"| (the whole sparse run, selection included, <= the first bound: {mb(allowed)} MiB) | {mb(run_peak)} MiB | "
        f"{'PASS' if run_peak <= allowed else 'FAIL'} |",
        "",
    ]


def check_table(results: dict, shape: dict, args) -> list[str]:
    """The memory model against the measurement, with the runtime each process measured."""
    lines = [
        "| | predicted model (MiB) | measured model (MiB) | predicted peak (MiB) | measured peak (MiB) | "
        "predicted / measured | within 10 % |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    foreach = args.device == "cuda"
    for method in METHODS:
        r = results[method]
        # the budget the measured selection ran under (its default follows the memory free on the machine)
        budget = args.selection_memory if args.selection_memory is not None else r.get("selection_report_budget")
        p = predict(shape, method, args.batch, args.seq, args.lora_r, r["runtime"], foreach=foreach,
                    selection_memory=budget, salience_batches=args.salience_batches)  # fmt: skip
        model = (p["base"], r["loaded"] - r["runtime"])
        rows.append((f"{NAMES[method]}: training steps (peak at: {p['peak_phase']})", *model, p["step_peak"],
                     r["step_peak"]))  # fmt: skip
        if method == "sparse":
            if "max_memory" in r["selection_call"]:
                label, peak = f"{p['selection_passes']} passes planned", p["selection_peak"]
            else:
                activations = p["selection_components"]["forward + backward activations"]
                label, peak = "one pass", p["loaded"] + one_pass_selection(shape, p["trainable"], activations)
            rows.append((f"sparse: selection ({label})", *model, peak, r["selection_peak"]))
    for name, p_model, m_model, p_peak, m_peak in rows:
        ratio = p_peak / m_peak
        lines.append(
            f"| {name} | {mb(p_model)} | {mb(m_model)} | {mb(p_peak)} | {mb(m_peak)} | {ratio:.3f} | "
            f"{'yes' if abs(ratio - 1) <= 0.10 else 'no'} |"
        )
    return lines + [""]


# GPUs the default selection is predicted on: an 80 GB one, and the smallest common size where QLoRA fits.
def selection_time_table(batch: int, seq: int, lora_r: int, batch_counts: tuple[int, ...]) -> list[str]:
    """The default selection's passes on each GPU of ``GPUS``, and its cost in training-step equivalents
    (:func:`step_equivalents_per_batch` x salience batches, each batch a training batch) for each of
    ``batch_counts``."""
    lines = [
        "| model (NF4) | GPU | free at selection | default max_memory | accumulators for one pass | passes | "
        + " | ".join(f"step-equivalents, {n} batches" for n in batch_counts)
        + f" | replay's host store at {batch_counts[len(batch_counts) // 2]} batches"
        + f" | bf16 accumulators: passes, step-equivalents at {batch_counts[len(batch_counts) // 2]} batches |",
        "|---|---|---|---|---|---|" + "---|" * (len(batch_counts) + 2),
    ]
    for name, shape in SHAPES.items():
        if predict(shape, "qlora", batch, seq, lora_r)["step_peak"] > max(size for _, size in GPUS[name]):
            continue
        sizes = [out * inp for out, inp in linear_shapes(shape)] * shape["layers"]
        for label, device in GPUS[name]:
            middle = batch_counts[len(batch_counts) // 2]
            p = predict(shape, "sparse", batch, seq, lora_r, device_bytes=device, salience_batches=middle)
            half = predict(
                shape,
                "sparse",
                batch,
                seq,
                lora_r,
                device_bytes=device,
                accumulation_dtype=torch.bfloat16,
                salience_batches=middle,
            )
            free = max(0, device - p["loaded"] - 8 * p["trainable"])
            steps = " | ".join(f"{p['selection_steps_per_batch'] * n:.0f}" for n in batch_counts)
            lines.append(
                f"| {name} | {label} | {gb(free)} GiB | {gb(p['selection_budget'])} GiB | {gb(4 * sum(sizes))} GiB | "
                f"{p['selection_passes']} | {steps} | {gb(p['selection_replay_host_bytes'])} GiB | "
                f"{half['selection_passes']}, {half['selection_steps']} |"
            )
    return lines + [""]


def prediction_table(batch: int, seq: int, lora_r: int, salience: int) -> list[str]:
    """The memory model for every shape in SHAPES: components, peaks and the goals, QLoRA and sparse side by side."""
    preds = {
        name: {m: predict(shape, m, batch, seq, lora_r, salience_batches=salience) for m in ("qlora", "sparse")}
        for name, shape in SHAPES.items()
    }
    columns = [(n, m) for n in preds for m in ("qlora", "sparse")]

    def row(label: str, fn, sparse_only: bool = False) -> str:
        cells = ["" if sparse_only and m == "qlora" else fn(preds[n][m], preds[n]) for n, m in columns]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [
        "| GiB | " + " | ".join(f"{n} {'QLoRA' if m == 'qlora' else 'sparse'}" for n, m in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for key in preds["TinyLlama-1.1B"]["qlora"]["components"]:
        lines.append(row(key, lambda p, _, key=key: gb(p["components"][key])))
    lines += [
        row("trainable entries", lambda p, _: f"{p['trainable'] / 1e6:.1f} M"),
        row("**training step peak**", lambda p, _: f"**{gb(p['step_peak'])}** ({p['peak_phase']})"),
        row("sparse / QLoRA peak", lambda p, both: f"{p['step_peak'] / both['qlora']['step_peak']:.3f}", True),
    ]

    def verdict(p, both) -> str:
        allowed = SLACK * both["qlora"]["step_peak"] + BYTES_PER_ENTRY * p["trainable"]
        return f"{'holds' if p['step_peak'] <= allowed else 'FAILS'} ({gb(allowed)} allowed)"

    lines.append(row(f"sparse <= {SLACK} x QLoRA + {BYTES_PER_ENTRY} B x entries", verdict, True))
    for key in preds["TinyLlama-1.1B"]["sparse"]["selection_components"]:
        lines.append(row(f"selection: {key}", lambda p, _, key=key: gb(p["selection_components"][key]), True))
    lines += [
        row("selection: default max_memory", lambda p, _: gb(p["selection_budget"]), True),
        row(
            "**selection peak**, layer groups (step-equivalents)",
            lambda p, _: (
                f"**{gb(p['selection_peak'])}**, {p['selection_passes']} ({salience} batches: {p['selection_steps']})"
            ),
            True,
        ),
        row(
            "whole run (selection included) <= the bound above",
            lambda p, both: (
                "holds"
                if max(p["step_peak"], p["selection_peak"])
                <= SLACK * both["qlora"]["step_peak"] + BYTES_PER_ENTRY * p["trainable"]
                else "FAILS"
            ),
            True,
        ),
        row(
            "selection extra <= step extra",
            lambda p, _: (
                f"{'holds' if p['selection_extra'] <= p['step_extra'] else 'FAILS'} "
                f"({gb(p['selection_extra'])} vs {gb(p['step_extra'])})"
            ),
            True,
        ),
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=22, help="decoder layers of the measured model (TinyLlama: 22)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per batch")
    parser.add_argument("--steps", type=int, default=3, help="training steps per method (the peak over them)")
    parser.add_argument("--lora-r", type=int, default=16, help="QLoRA rank; the sparse budget is its count")
    parser.add_argument("--salience-batches", type=int, default=2, help="batches select_mask scores over")
    parser.add_argument(
        "--selection-memory",
        type=int,
        default=None,
        help="select_mask(max_memory=...) in bytes, where select_mask has it (default: select_mask's own default)",
    )
    parser.add_argument(
        "--layers-per-pass", type=int, default=None, help="select_mask(layers_per_pass=...) (default: None)"
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help=f"CPU: leave glibc's dynamic mmap threshold (default: MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD})",
    )
    parser.add_argument(
        "--cap-at-bound",
        action="store_true",
        help="sparse: selection sees only the bound (1.05 x QLoRA's peak + 18 B per entry) as the machine's memory",
    )
    parser.add_argument("--free-cap", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--predict-only", action="store_true", help="print the memory model's predictions only")
    parser.add_argument("--save-records", metavar="PATH", help="also save the raw measurements as JSON")
    parser.add_argument("--records", metavar="PATH", help="report the measurements saved in PATH instead of measuring")
    parser.add_argument("--write", action="store_true", help="rewrite this section of benchmarks/RESULTS.md")
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return

    shape = dict(SHAPES["TinyLlama-1.1B"], layers=args.layers)
    flags = "".join(
        f" --{name.replace('_', '-')}" + ("" if value is True else f" {value}")
        for name, value in vars(args).items()
        if name not in ("measure", "model_dir", "save_records", "records", "free_cap")
        and value != parser.get_default(name)
    )
    lines = [HEADING, "", f"Command: `python benchmarks/memory.py{flags}`, run on {date.today().isoformat()}."]
    if not args.predict_only:
        lines[-1] = lines[-1][:-1] + f", on {machine(args.device)}."
        if args.records:
            results = json.loads(Path(args.records).read_text())
        else:
            results = {}
            with tempfile.TemporaryDirectory(prefix="peft_sparse_memory_") as folder:
                print(f"saving the seeded {args.layers}-layer model to {folder} ...", file=sys.stderr, flush=True)
                seeded_llama(dict(shape, seq=args.seq), torch.bfloat16).save_pretrained(folder)
                for method in METHODS:
                    if method == "sparse" and args.cap_at_bound:  # the bound: QLoRA's peak and its count
                        qlora = results["qlora"]
                        args.free_cap = int(SLACK * qlora["step_peak"] + BYTES_PER_ENTRY * qlora["trainable"])
                    results[method] = run_method(method, args, folder)
                    if method == "sparse" and args.free_cap is not None:
                        results[method]["free_cap"] = args.free_cap
        if args.save_records:
            Path(args.save_records).write_text(json.dumps(results, indent=1))
        lines += [
            "",
            f"Measured: TinyLlama-1.1B's shape with {args.layers} layers, seeded random weights, NF4 (double "
            "quantisation, bf16 compute) through from_pretrained, prepare_model_for_kbit_training (reentrant "
            f"checkpointing: embeddings, lm_head and norms in fp32); batch {args.batch} x {args.seq}; {args.steps} "
            f"AdamW steps; all linear layers; LoRA r={args.lora_r}; sparse: selection='gradient' over "
            f"{args.salience_batches} batches. Peak memory: "
            + (
                "peak allocated (GPU)"
                if args.device == "cuda"
                else "VmHWM of the method's own process (CPU resident set"
                + ("" if args.default_malloc else f", MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}")
                + ")"
            )
            + "; 'runtime' is the process after importing torch, transformers, peft, bitsandbytes and peft_sparse.",
            "",
        ]
        lines += measured_table(results) + goals(results)
        lines += ["The memory model against this measurement (each process's runtime included):", ""]
        lines += check_table(results, shape, args)
        untracked = sorted({t for r in results.values() for t in r["untracked"]})
        lines += [
            "Tensors of 1 MiB or more alive between training steps besides the model's parameters, buffers, "
            "gradients and the optimizer state: " + (", ".join(untracked) or "none") + ".",
            "",
        ]
    lines += [
        "",
        f"Predicted by the memory model for NF4 (double quantisation) at batch {args.batch} x {args.seq}, reentrant "
        f"checkpointing, QLoRA r={args.lora_r} vs sparse at the same count, GPU accounting (no runtime; AdamW "
        f"foreach), selection over {args.salience_batches} batches under select_mask's default budget:",
        "",
    ]
    lines += prediction_table(args.batch, args.seq, args.lora_r, args.salience_batches)
    lines += [
        "The default selection on a GPU (select_mask's budget from the memory free once the NF4 model and the "
        "adapter are loaded), in training-step equivalents of a frozen-base step on a "
        f"{args.batch} x {args.seq} batch (`memory_model.step_equivalents_per_batch` x salience batches: one group "
        "4/3 per batch, two groups 2, three or more by block replay 1 + 4/3 x the blocks replayed over the blocks: "
        "7/3 where no block is split between groups; the boundaries replay keeps are host memory, not the GPU's):",
        "",
    ]
    lines += selection_time_table(args.batch, args.seq, args.lora_r, (4, 16, 64))
    publish(lines, args.write)


if __name__ == "__main__":
    main()
