"""The per-component memory model of 4-bit training (what ``benchmarks/memory.py`` checks against its measurement
and uses to predict Llama-3-8B and -70B): for a Llama config in NF4 with reentrant gradient checkpointing at batch
b x s, the base weights, the adapter state, the activations checkpointing keeps and the one block it recomputes, the
fp32 logits and loss, the per-layer dequantised weight, and selection's accumulators, candidate set, passes and time
(training-step equivalents) under ``select_mask``'s default budget on a given GPU."""

from __future__ import annotations

import torch

SHAPES = {
    "TinyLlama-1.1B": {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4,
                       "vocab": 32000},
    "Llama-3-8B": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8, "vocab": 128256},
    "Llama-3-70B": {"hidden": 8192, "intermediate": 28672, "layers": 80, "heads": 64, "kv_heads": 8,
                    "vocab": 128256},
}  # fmt: skip
METHODS = ("base", "qlora", "sparse")
NAMES = {"base": "frozen 4-bit base (limit)", "qlora": "QLoRA r=16", "sparse": "sparse, QLoRA's count"}
MiB, GiB = 2**20, 2**30
SLACK, BYTES_PER_ENTRY = 1.05, 18  # the goal: sparse peak <= SLACK x QLoRA's + BYTES_PER_ENTRY x trainable entries


def linear_shapes(shape: dict) -> list[tuple[int, int]]:
    """(out, in) of the seven projections of one decoder layer, in module order."""
    h, i = shape["hidden"], shape["intermediate"]
    kv = h // shape["heads"] * shape["kv_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def lora_count(shape: dict, r: int) -> int:
    """LoRA r's trainable parameters on all seven projections of every layer (= the sparse budget)."""
    return shape["layers"] * sum(r * (out + inp) for out, inp in linear_shapes(shape))


def predict(
    shape: dict,
    method: str,
    batch: int = 1,
    seq: int = 512,
    lora_r: int = 16,
    runtime: int = 0,
    compute_bytes: int = 2,
    foreach: bool = True,
    selection_memory: int | None = None,
    salience_batches: int = 2,
    device_bytes: int | None = None,
    accumulation_dtype: torch.dtype = torch.float32,
) -> dict:
    """Predicted bytes, per component, of ``method`` ("base", "qlora", "sparse") training a Llama of ``shape`` with
    its decoder linears in NF4 (double quantisation), the rest in fp32 (as ``prepare_model_for_kbit_training``
    leaves it), reentrant gradient checkpointing, a batch of ``batch`` x ``seq`` tokens and AdamW.

    ``runtime``: the torch / Python process (CPU resident set; 0 for a GPU's allocated memory). ``foreach``: AdamW's
    multi-tensor step (the default on a GPU) allocates a temporary of 4 B per trainable entry. For sparse,
    ``selection_memory`` is the ``max_memory`` given to ``select_mask`` (``None``: its default), see
    :func:`selection`; ``device_bytes``: the GPU's memory, of which the loaded model and the adapter's values and
    indices leave the rest free at selection (``None``: free memory unknown, the default's floor).

    Returns the components (bytes), ``loaded`` (runtime + base weights), ``step_extra`` / ``step_peak`` (the
    training step's peak above the loaded model / in all), ``peak_phase`` (when it peaks) and, for sparse,
    selection's figures.
    """
    h, i, layers, vocab = shape["hidden"], shape["intermediate"], shape["layers"], shape["vocab"]
    kv = h // shape["heads"] * shape["kv_heads"]
    tokens = batch * seq
    fp32 = 4
    per_layer = [out * inp for out, inp in linear_shapes(shape)]
    quantised = layers * sum(per_layer)
    c = {}
    # Base weights. NF4 packs two weights a byte; double quantisation keeps a uint8 absmax per 64-weight block and
    # an fp32 absmax per 256 blocks. Embeddings, lm_head and norms stay unquantised: fp32 after prepare_model_...
    c["NF4 packed weights (0.5 B/w)"] = quantised // 2
    c["absmax + nested absmax"] = quantised // 64 + quantised // (64 * 256) * fp32
    c["embeddings + lm_head + norms (fp32)"] = (2 * vocab * h + (2 * layers + 1) * h) * fp32
    base = sum(c.values())
    # Adapter state. QLoRA: r (in + out) fp32 parameters + two AdamW moments, and their gradients from the backward
    # to the step. Sparse: k fp32 values + int32 indices + two moments, and the values' gradients.
    k = lora_count(shape, lora_r) if method != "base" else 0
    state = k * {"base": 0, "qlora": 3 * fp32, "sparse": 3 * fp32 + 4}[method]
    grads = k * fp32
    c["adapter state (16 B/param; sparse 16 B/entry with the index)"] = state
    c["adapter gradients (4 B/entry)"] = grads
    # Activations under checkpointing: every layer's input (fp32 residual stream), the residual gradient and its sum
    # in the backward, and the loss: fp32 logits, log_softmax's output and its gradient (3 x tokens x vocab).
    checkpoints = layers * tokens * h * fp32
    stream = 2 * tokens * h * fp32
    loss = 3 * tokens * vocab * fp32
    # One block recomputed for its backward. What autograd keeps (frozen weights save no activation): q and k after
    # RoPE, v, the attention output, the residual sum the second norm reads, the block output (4 h + 2 kv wide), and
    # the MLP's gate, up and silu outputs (3 i); the backward then holds about two gradients of each width. LoRA
    # saves its fp32 inputs (norm outputs, attention output, MLP product: 3 h + i); a sparse layer saves its input
    # cast to the compute dtype, once per layer (q, k, v, o, gate, up: 6 h; down: i).
    block = tokens * fp32 * (4 * h + 2 * kv + 3 * i) + tokens * fp32 * (2 * h + 2 * i)
    if method == "qlora":
        block += tokens * fp32 * (3 * h + i)
    elif method == "sparse":
        block += tokens * compute_bytes * (6 * h + i)
    # The dense weight a 4-bit linear decodes for its forward and again for its backward, one layer at a time.
    dequant = max(per_layer) * compute_bytes
    c["checkpointed layer inputs"] = checkpoints
    c["residual gradient"] = stream
    c["logits + loss (fp32)"] = loss
    c["one block's recompute + backward"] = block
    c["dequantised weight (one layer)"] = dequant
    # When each peaks: the loss at the start of the backward (every checkpoint alive, no gradient yet); the last
    # layer's block (every checkpoint, one layer's gradients); the first layer's block (one checkpoint, all the
    # gradients); the optimizer step (all gradients, the foreach temporaries).
    phases = {
        "loss": checkpoints + stream + loss,
        "last block": checkpoints + stream + block + dequant + grads // layers,
        "first block": tokens * h * fp32 + stream + block + dequant + grads,
        "optimizer step": grads + (k * fp32 if foreach else 0),
    }
    phase = max(phases, key=phases.get)
    out = {
        "components": c,
        "runtime": runtime,
        "base": base,
        "loaded": runtime + base,
        "trainable": k,
        "step_extra": state + phases[phase],
        "step_peak": runtime + base + state + phases[phase],
        "peak_phase": phase,
    }
    if method == "sparse":
        activations = checkpoints + stream + max(loss, block + dequant)
        free = None if device_bytes is None else max(0, device_bytes - runtime - base - 8 * k)
        out.update(
            selection(
                shape, k, activations, selection_memory, salience_batches, free, accumulation_dtype, tokens=tokens
            )
        )
        out["selection_peak"] = runtime + base + out["selection_extra"]
    return out


def _selection_constants(accumulation_dtype: torch.dtype = torch.float32) -> tuple[int, int, int, int]:
    """select_mask's planning constants where it has them (else those of its first version): bytes reserved per
    entry for the running top-k's candidates, the default budget's room per entry (the adapter's training state)
    and its least room in bytes, and the scoring temporaries per weight of a layer ranked by gradient salience from
    fp32 accumulators."""
    try:
        from peft_sparse.selection import passes, select
        from peft_sparse.selection.salience import METRICS

        scoring = passes.scoring_bytes_per_weight(METRICS["gradient"], accumulation_dtype)
        least = getattr(select, "MIN_DEFAULT_ACCUMULATOR_BYTES", 0)
        return select.CANDIDATE_BYTES_PER_ENTRY, select.TRAINING_STATE_BYTES_PER_ENTRY, least, scoring
    except (ImportError, AttributeError, TypeError):
        return 12, 16, 0, 0


def _free_memory_share() -> tuple[float, float | None]:
    """select_mask's share of the free memory for one pass, and its margin where memory is tight (None: a
    select_mask that took the share there too)."""
    try:
        from peft_sparse.selection import select
    except ImportError:
        return 0.0, None
    return getattr(select, "FREE_MEMORY_SHARE", 0.0), getattr(select, "TIGHT_MEMORY_MARGIN", None)


def selection(
    shape: dict,
    k: int,
    pass_activations: int,
    budget: int | None,
    batches: int,
    free: int | None = None,
    accumulation_dtype: torch.dtype = torch.float32,
    one_top_k: bool = False,
    tokens: int = 512,
) -> dict:
    """Salience selection as ``select_mask(max_memory=...)`` plans it: the linear layers, in module order, are split
    into groups whose fp32 gradient accumulators (4 B per weight) plus the scoring temporaries of the group's largest
    layer fit in ``budget`` next to the chosen entries' reserve: under the default per-layer budget each scored
    layer's chosen positions (4 B per entry) and one layer's candidates (12 B per entry of the largest layer's k);
    under ``one_top_k`` (``budget="global"``) the running top-k's candidate set (12 B per entry). ``None``: select_mask's
    default budget, the reserve + the adapter's training state (16 B per entry, at least select_mask's floor for
    the accumulators, where it has one). One group is one pass over the ``batches``, each batch a forward +
    backward (about one training step); several groups are scored by block replay, about two steps per batch
    (:func:`step_equivalents_per_batch`), and keep in host memory each group boundary's input and output gradient
    (``2 x groups x batches x tokens x hidden x 4`` bytes, not counted here: it is not the GPU's).

    Held at a pass's peak: the adapter's values and indices (8 B per entry, allocated at injection), the running
    top-k's candidate set (its reserve), the largest group's accumulators, a forward + backward's activations
    (while a layer is scored, after the pass: its temporaries instead), and the values' gradients: under reentrant
    checkpointing the salience backward is a full ``loss.backward()`` (autograd.grad cannot reach values inside a
    replayed block), which fills every trainable value's ``.grad`` (4 B per entry) before they are put back.

    ``free``: the bytes the device has free when selection starts; the default budget is then select_mask's: one
    pass where ``FREE_MEMORY_SHARE`` of it holds every accumulator, else what is free less ``TIGHT_MEMORY_MARGIN`` of
    it and a salience batch's forward and backward (which select_mask measures: here ``pass_activations`` and the
    values' gradients), never below the floor above.
    ``accumulation_dtype``: the accumulators' dtype, ``SparseConfig.selection_accumulation_dtype`` (bf16: 2 B per
    weight, and scoring converts one layer's accumulator to float32)."""
    reserve_per_entry, state_per_entry, least_room, scoring = _selection_constants(accumulation_dtype)
    acc = accumulation_dtype.itemsize  # gradient salience: one accumulator per weight
    per_block = len(linear_shapes(shape))
    sizes = [out * inp for out, inp in linear_shapes(shape)] * shape["layers"]
    if one_top_k:
        reserve = reserve_per_entry * k
    else:  # the same density in every layer: the largest layer's share of k
        reserve = 4 * k + reserve_per_entry * (k * max(sizes) // sum(sizes))
    if budget is None:
        budget = max(reserve + (acc + scoring) * max(sizes), reserve + max(state_per_entry * k, least_room))
        if free is not None:
            one_pass = reserve + acc * sum(sizes) + scoring * max(sizes)
            share, margin = _free_memory_share()
            if one_pass <= share * free or margin is None:
                budget = max(budget, min(one_pass, int(share * free)))
            else:  # tight: what is free less a salience batch's forward and backward (and the values' gradients)
                budget = max(budget, min(one_pass, int((1 - margin) * free) - pass_activations - 4 * k))
    groups, start = [], 0
    while start < len(sizes):
        end = start + 1
        while (
            end < len(sizes)
            and reserve + acc * sum(sizes[start : end + 1]) + scoring * max(sizes[start : end + 1]) <= budget
        ):
            end += 1
        groups.append(sizes[start:end])
        start = end
    # Block replay (three groups or more) runs, per batch, the recording pass and each group's decoder blocks: a block
    # shared by several groups runs once for each. It keeps, per batch, the input of each group's lowest block and
    # the gradient at its top block's output (fp32 residual stream) in host memory.
    spans = block_spans([len(group) for group in groups], per_block)
    replayed_blocks = sum(top - low + 1 for low, top in spans)
    boundaries = len({low for low, _ in spans}) + len({top for _, top in spans})
    host_store = boundaries * batches * tokens * shape["hidden"] * 4 if len(groups) >= 3 else 0
    components = {
        "adapter values + indices (8 B/entry)": 8 * k,
        "chosen entries / candidates"
        + (f" ({reserve_per_entry} B/entry)" if one_top_k else " (4 B/entry + one layer's)"): reserve,
        f"largest group's accumulators ({acc} B/w)": max(acc * sum(group) for group in groups),
        "forward + backward activations": max(pass_activations, scoring * max(sizes)),
        "values' gradients (4 B/entry)": 4 * k,
    }
    return {
        "selection_components": components,
        "selection_budget": budget,
        "selection_extra": sum(components.values()),
        "selection_passes": len(groups),
        "selection_steps_per_batch": (
            per_batch := step_equivalents_per_batch(len(groups), replayed_blocks, shape["layers"])
        ),
        "selection_steps": round(per_batch * batches),
        "selection_replay_host_bytes": host_store,
    }


def block_spans(group_lengths: list[int], per_block: int) -> list[tuple[int, int]]:
    """(lowest, top) decoder block of each layer group, the groups taking ``group_lengths`` layers in module order
    and every block ``per_block`` of them: the blocks block replay runs for each group."""
    spans, start = [], 0
    for length in group_lengths:
        spans.append((start // per_block, (start + length - 1) // per_block))
        start += length
    return spans


def one_pass_selection(shape: dict, k: int, pass_activations: int) -> int:
    """Extra bytes of ``select_mask`` before ``max_memory`` existed (``layers_per_pass=None``: one pass): fp32
    accumulators for every targeted weight during the pass; then an fp32 score per weight, all kept for the top-k,
    whose bisection builds an int64 key per weight while the scores are alive (12 B per weight), and the adapter's
    values and indices."""
    per_layer = [out * inp for out, inp in linear_shapes(shape)]
    total = shape["layers"] * sum(per_layer)
    return 8 * k + max(4 * total + pass_activations, 8 * total, 12 * total + 20 * max(per_layer))


GPUS = {
    "TinyLlama-1.1B": (("80 GB", 80 * 10**9), ("8 GB", 8 * 10**9)),
    "Llama-3-8B": (("80 GB", 80 * 10**9), ("24 GB", 24 * 10**9)),
    "Llama-3-70B": (("80 GB", 80 * 10**9), ("48 GB", 48 * 10**9)),
}


def step_equivalents_per_batch(passes: int, replayed_blocks: int | None = None, blocks: int | None = None) -> float:
    """Training-step equivalents one salience batch costs when the layers are scored in ``passes`` groups, under
    reentrant checkpointing (the QLoRA recipe). In forwards' worth F: an adapter's training step on a frozen base is
    a forward, the checkpoint's recompute and the backward's input gradients, 3F (the base's weight gradients are
    never formed). A salience pass also forms the dense weight gradient of every probed layer, F more: one group
    costs 4/3 of a step. Several groups: whole passes each run the forward and back-propagate down to their group's
    lowest block, ``G F + (G + 1) F + F``, so ``(2G + 2) / 3`` (2 for two groups); from three groups on, block replay
    (``peft_sparse.selection.replay``): a recording pass without probes (3F) and each group's own blocks, 4F where
    every block belongs to one group: 7/3 whatever the number of groups. Groups smaller than a decoder block replay
    that block once each: ``replayed_blocks`` (the blocks the groups' replays run, summed over groups) of ``blocks``
    cost ``1 + 4/3 x replayed_blocks / blocks`` (default: every block once). Measured on the CPU (``benchmarks/selection_replay.py``, 8 layers, 8
    groups; SmolLM2-135M, 6 groups): 1.19 / 1.12, 1.95 / 2.29 and 6.20 / 4.80 steps per batch for one pass, replay
    and whole passes, against 1.33, 2.33 and 6 / 4.67."""
    if passes <= 0:
        return 0.0
    if passes == 1:
        return 4 / 3
    if passes == 2:
        return 2.0
    if replayed_blocks is None or not blocks:
        return 7 / 3
    return 1 + 4 / 3 * replayed_blocks / blocks
