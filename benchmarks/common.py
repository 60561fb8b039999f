"""What the benchmarks share: timing (``median_time``, paired ratios), peak memory, the interleaved step comparison
(``compare_steps``), a seeded Llama built from a config and its training step, the machine's description, the
writing of a script's section of RESULTS.md, and the rate sweep of the quality benchmarks (``ladder``, ``sweep``, ``mean_std``).

Every script in this folder imports it as ``common`` (``python benchmarks/SCRIPT.py`` puts the folder on the path);
``peft-sparse bench`` runs them all.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
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


def compare_steps(
    script: str,
    build: Callable[[str], tuple[Callable[[], None], int]],
    methods: tuple[str, ...],
    device: str,
    repeats: int,
    *,
    references: tuple[str, ...],
    peak_memory_args: tuple[str, ...] = (),
    warmup_rounds: int = 2,
    unsupported: tuple[type[BaseException], ...] = (),
) -> dict:
    """Training-step time and peak memory of each of ``methods``, the loop every step benchmark shares.

    ``build(method)`` gives (step, trainable count). Every method is built once in this process and their steps run
    interleaved, round by round (``warmup_rounds`` untimed, then ``repeats`` timed), so that a slow phase of the
    machine hits all alike; ``per_<reference>`` holds the median of the per-round ratios (``add_paired_ratios``),
    ``step_ms`` the median step. Peak memory needs a process per method: ``script --peak-memory METHOD --device
    DEVICE *peak_memory_args`` must print it on its last line (``steps_peak_memory``). A method whose build or first
    step raises one of ``unsupported`` is recorded as ``{"unsupported": "<error>"}`` instead (a peft tuner that
    cannot take the model); with no ``unsupported`` types, every error propagates.
    """
    steps, results = {}, {}
    for method in methods:
        try:
            step, trainable = build(method)
            if unsupported:  # some tuners build on a layer they then fail to run
                step()
        except unsupported as err:
            results[method] = {"unsupported": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}
            continue
        steps[method] = step
        results[method] = {"trainable": trainable, "times": []}
    for _ in range(warmup_rounds):
        for step in steps.values():
            step()
    for _ in range(repeats):
        for method, step in steps.items():
            results[method]["times"].append(median_time(step, device, 1, warmup=0))
    steps = step = None  # the models go before the peak-memory processes start
    if device == "cuda":
        torch.cuda.empty_cache()
    timed = {method: record for method, record in results.items() if "times" in record}
    add_paired_ratios(timed, references)
    for method, record in timed.items():
        record["step_ms"] = statistics.median(record.pop("times")) * 1e3
        out = subprocess.run(
            [sys.executable, script, "--peak-memory", method, "--device", device, *peak_memory_args],
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ),
        )
        record["peak_bytes"] = int(out.stdout.strip().splitlines()[-1])
    return results


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


def publish(lines: list[str], write: bool) -> None:
    """Print a script's RESULTS.md section and, with ``write`` (its ``--write``), put it in RESULTS.md."""
    text = "\n".join(lines)
    print(text)
    if write:
        write_section(RESULTS, text)


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


# --------------------------------------------------------------------------- rate sweeps (suite, sft_quality, capacity)


def ladder(lr: float, up: bool) -> float:
    """The next rate on the 1-3-10 ladder (3e-3 -> 1e-2 -> 3e-2 up; 3e-4 -> 1e-4 -> 3e-5 down)."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    if up:
        return float(f"3e{int(exponent)}") if mantissa == "1" else float(f"1e{int(exponent) + 1}")
    return float(f"1e{int(exponent)}") if mantissa == "3" else float(f"3e{int(exponent) - 1}")


def score(record: dict | None, key: str) -> float:
    """``record[key]`` where it is a finite number, else infinity (a diverged or missing run is never the best)."""
    value = None if record is None else record.get(key)
    return value if value is not None and math.isfinite(value) else math.inf


def sweep(start: tuple[float, ...], get: Callable[[float], dict | None], key: str) -> tuple[list[float], float | None]:
    """(the grid, the best rate): ``get(lr)`` is seed 0's record at ``lr`` (None: not run yet, then the best is None
    too), scored by ``key`` (lower is better; ties: the lower rate). A best rate at an edge of the grid extends the
    grid that way on the 1-3-10 ladder, up to two rates beyond ``start``: no method's best is left at an edge."""
    grid = sorted(start)
    while True:
        records = {lr: get(lr) for lr in grid}
        if any(record is None for record in records.values()):
            return grid, None
        best = min(grid, key=lambda lr: score(records[lr], key))
        if best == max(grid) and len(grid) < len(start) + 2:
            grid.append(ladder(best, up=True))
        elif best == min(grid) and len(grid) < len(start) + 2:
            grid.insert(0, ladder(best, up=False))
        else:
            return grid, best


def mean_std(values: list[float], digits: int = 3, percent: bool = False) -> str:
    """``mean ± standard deviation`` over seeds ("VALUE (1 seed)" for one, "" for none)."""
    if not values:
        return ""
    form = (lambda x: f"{x:.1%}") if percent else (lambda x: f"{x:.{digits}f}")
    if len(values) == 1:
        return f"{form(values[0])} (1 seed)"
    return f"{form(statistics.mean(values))} ± {form(statistics.stdev(values))}"
