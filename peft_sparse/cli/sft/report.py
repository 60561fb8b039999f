"""``peft-sparse sft``'s report: the table, the loss plot, ``results.json``."""

from __future__ import annotations

from pathlib import Path

from .. import compare
from .arguments import PROG


def method_name(record: dict) -> str:
    if record["method"] == "lora":
        return f"LoRA r={record['lora_rank']}" + (" (QLoRA)" if record["quantization"].startswith("4-bit") else "")
    name = f"sparse, {record['selection'].replace('_', '-')} mask"
    name += f", {record['update']}" if record["update"] != "static" else ""
    return name + (f", + rank {record['sparse_r']}" if record["sparse_r"] else "")


def table(records: list[dict]) -> str:
    """The runs as a markdown table (step time and memory also as ratios to LoRA when LoRA ran)."""
    lora = next((r for r in records if r["method"] == "lora"), None)
    scored = next((r for r in records if r["exact_match"] is not None), None)
    header = ["method", "trainable parameters", "held-out loss, before -> after"]
    if scored:
        header.append(f"exact match ({scored['exact_match_rows']} held-out rows)")
    header += ["step time, median", "peak memory"]
    rows = []
    for r in records:
        row = [method_name(r), f"{r['trainable']:,}", f"{r['eval_loss_before']:.3f} -> {r['eval_loss_after']:.3f}"]
        if scored:
            row.append(
                "n/a" if r["exact_match"] is None else f"{r['exact_match_before']:.1%} -> {r['exact_match']:.1%}"
            )
        step, memory = r.get("step_seconds_interleaved") or r["step_seconds_median"], f"{r['peak_memory_mb']:,.0f} MB"
        speed = "n/a" if step is None else f"{step * 1e3:,.0f} ms"
        if lora is not None and r is not lora:
            if r.get("step_time_vs_lora") is not None:  # a ratio only where both were timed side by side
                speed += f" ({r['step_time_vs_lora']:.2f}x LoRA)"
            memory += f" ({r['peak_memory_mb'] / lora['peak_memory_mb']:.2f}x LoRA)"
        rows.append(row + [speed, memory])
    return compare.markdown_table(header, rows)


def plot(records: list[dict], path: Path) -> None:
    """Train loss (thin) and held-out loss (markers) against the optimizer step, every run, written to ``path``."""
    import matplotlib

    ylabel = "loss (completion tokens where TRL masks the prompt)"
    with compare.loss_figure(path, PROG, ylabel, fontsize="small") as axis:
        for r, color in zip(records, matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]):
            for key, label, style in (
                ("loss", "train", {"linewidth": 1, "alpha": 0.7}),
                ("eval_loss", "held-out", {"marker": "o"}),
            ):
                points = [(e["step"], e[key]) for e in r["log_history"] if key in e]
                if points:  # none where logging or evaluation was switched off
                    axis.plot(*zip(*points), color=color, label=f"{method_name(r)}: {label}", **style)


def header(records: list[dict], training_args) -> str:
    """The lines above the table: the model, the data, the schedule and each method's rate."""
    first = records[0]
    rates = ", ".join(f"{method_name(r)} lr {r['learning_rate']:g}" for r in records)
    return "\n".join(
        [
            f"model: {first['model']}" + (f", {first['quantization']} base" if first["quantization"] else ""),
            f"data:  {first['data']}",
            f"{first['steps']} steps of {training_args.per_device_train_batch_size} x "
            f"{training_args.gradient_accumulation_steps}, max_length {training_args.max_length}; {rates}; device "
            f"{first['device']}",
        ]
    )


def timing_note(records: list[dict]) -> str | None:
    """How the step times were taken, where they were taken side by side."""
    if not any("timing_rounds" in r for r in records):
        return None
    return (
        f"Step time: the median optimizer step (forward, backward, AdamW) of each saved adapter, timed side by side "
        f"in one process over {records[0]['timing_rounds']} rounds after a warm-up; the ratio is the median of the "
        "per-round ratios, so a change in the machine's load cannot skew it. Mask updates, selection and evaluation "
        "are not in it."
    )
