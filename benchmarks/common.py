"""What the benchmarks share: timing (``median_time``, paired ratios), peak memory, a seeded Llama built from a
config and its training step, the machine's description, and the writing of a script's section of RESULTS.md.

Every script in this folder imports it as ``common`` (``python benchmarks/SCRIPT.py`` puts the folder on the path);
``peft-sparse bench`` runs them all.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from peft_sparse._memory import peak_memory_bytes, reset_peak_memory

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: str, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def add_paired_ratios(results: dict, references: tuple[str, ...]) -> None:
    """For every method, ``per_<reference>``: the median over rounds of its step time divided by the reference's
    step time in the same round (``results[method]["times"]``, one entry per round). Steps of one round run back to
    back, so their ratio is what a slow phase of the machine leaves alone."""
    for record in results.values():
        for name in references:
            paired = [a / b for a, b in zip(record["times"], results[name]["times"], strict=True)]
            record[f"per_{name}"] = statistics.median(paired)


def steps_peak_memory(step, device: str, steps: int = 3) -> int:
    """Peak memory while ``step()`` runs ``steps`` times: peak allocated on the GPU (counted from here), or the
    process's peak resident set on the CPU (run it in a process of its own)."""
    if device == "cuda":
        torch.cuda.synchronize()
        reset_peak_memory(device)
    for _ in range(steps):
        step()
    sync(device)
    peak = peak_memory_bytes(device)
    if peak is None:
        raise RuntimeError("VmHWM not found in /proc/self/status")
    return peak


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def seeded_llama(shape: dict, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised (``seed``) Llama of ``shape`` (``hidden``, ``intermediate``, ``layers``, ``heads``,
    ``kv_heads`` (default: ``heads``), ``vocab``, ``seq``) in ``dtype``, on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape.get("kv_heads", shape["heads"]),
        vocab_size=shape["vocab"],
        max_position_embeddings=shape["seq"],
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype=dtype)


def causal_lm_step(model, vocab: int, batch: int, seq: int, device: str, lr: float):
    """(step, trainable count): one training step (forward, backward, AdamW on the trainable parameters) of a causal
    LM on a fixed batch of seeded token ids. With nothing trainable (the frozen base) the backward still runs down to
    the input embeddings: the part every adapter pays for."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr) if params else None
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    embed = model.get_input_embeddings()

    def step():
        if optimizer is None:
            embeds = embed(ids).detach().requires_grad_()
            model(inputs_embeds=embeds, labels=ids).loss.backward()
            return
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def write_section(path: Path, section: str) -> None:
    """Replace this script's section of RESULTS.md (from its heading to the next '## '), keeping the others."""
    heading = section.splitlines()[0]
    existing = path.read_text() if path.exists() else "# Benchmark results\n\nRatios measured in one run.\n\n"
    if heading in existing:
        start = existing.index(heading)
        end = existing.find("\n## ", start + len(heading))
        existing = existing[:start] + section.rstrip() + "\n" + ("" if end < 0 else existing[end:])
    else:
        existing = existing.rstrip() + "\n\n" + section.rstrip() + "\n"
    path.write_text(existing)
