"""Runtime probes for defects of bitsandbytes' own CPU 4-bit path, so that no test takes a defective bitsandbytes as
its judge and no skip happens where bitsandbytes is sound.

The tests judge 4-bit results against peft-sparse's own decode (``peft_sparse.ops.reference.dequant_scatter``, in
float64: ``tiny_models.decode_4bit``). bitsandbytes itself is only compared with where a test is *about* agreeing
with bitsandbytes; those comparisons run on 64-aligned shapes (every ``in_features`` a multiple of the 64-element
block, as in real models) everywhere, and on the 32-wide ``tiny_llama`` only where the probes below find
bitsandbytes sound.

Measured with bitsandbytes 0.50.2 and torch 2.13 on an AMD EPYC CPU with AVX512-BF16:

* ``bitsandbytes.functional.dequantize_4bit`` on the CPU mis-decodes weights whose ``in_features`` is not a multiple
  of the blocksize (seen for 32, 48, 96 and 160 wide rows with blocksize 64, several rows): a 64x32 NF4 weight decodes
  with 40 % relative error against the original where the correct decode has 9 %. ``quantize_4bit`` numbers the
  blocks over the flattened weight; its native CPU decoder does not read them back that way. Odd ``in_features`` go
  through bitsandbytes' generic fallback and decode correctly, and not every even width fails (130 with blocksize 128
  decodes correctly), hence a probe per comparison rather than a rule on the shape.
* ``bitsandbytes.nn.Linear4bit.forward`` on an AVX512-BF16 CPU, in eval mode with an input that does not require
  grad, first repacks the weight for its bf16 inference kernel (``_convert_weight_packed_for_cpu``), which reshapes
  ``absmax`` to ``(out_features, in_features // blocksize)`` and raises ``RuntimeError: shape '[32, 0]' is invalid
  for input of size 16`` for ``in_features`` 32; in training mode it computes with the mis-decoded weight above.

Each probe runs once per session (a few milliseconds) and returns ``None`` where bitsandbytes behaves, else the skip
reason: what was measured on this machine.
"""

from __future__ import annotations

import functools

import torch

# The probe weight: 64 x 32, so in_features (32) is not a multiple of the 64-element block, as in tiny_llama.
PROBE_SHAPE = (64, 32)
PROBE_BLOCKSIZE = 64
# Gross error, far above any rounding: relative L2 distance from our decode that counts as a mis-decode. A correct
# fp32 decode is bit-exact, bitsandbytes' bf16 CPU inference kernel is off by ~4e-3; the defect gives ~0.4.
GROSS = 5e-2


def _platform() -> str:
    import bitsandbytes
    import bitsandbytes.functional as bnb_functional

    return (
        f"bitsandbytes {bitsandbytes.__version__}, torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, AVX512-BF16 {'yes' if bnb_functional.has_avx512bf16() else 'no'}"
    )


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm())


def _probe_weight() -> torch.Tensor:
    return torch.randn(PROBE_SHAPE, generator=torch.Generator().manual_seed(0))


@functools.cache
def dequantize_4bit_defect() -> str | None:
    """``None`` if bitsandbytes' CPU ``dequantize_4bit`` decodes a 64x32 NF4 weight (in_features not a multiple of
    the 64 blocksize) as our float64 reference decode does, else the reason to skip a comparison with it."""
    import bitsandbytes.functional as bnb_functional
    from tiny_models import decode_4bit

    weight = _probe_weight()
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=PROBE_BLOCKSIZE, quant_type="nf4", compress_statistics=False
    )
    ours = decode_4bit(packed, state)
    theirs = bnb_functional.dequantize_4bit(packed, state)
    gap = _rel(theirs, ours)
    if gap <= GROSS:
        return None
    return (
        f"bitsandbytes defect on this CPU ({_platform()}): dequantize_4bit mis-decodes 4-bit weights whose "
        f"in_features is not a multiple of the blocksize; probe: a 64x32 NF4 weight (blocksize 64) decodes with "
        f"{_rel(theirs, weight):.0%} relative error against the original weight, peft-sparse's float64 reference "
        f"decode with {_rel(ours, weight):.0%} ({gap:.0%} apart)"
    )


@functools.cache
def linear4bit_forward_defect() -> str | None:
    """``None`` if ``bitsandbytes.nn.Linear4bit`` with the 64x32 probe weight (in_features 32, not a multiple of the
    64 blocksize) computes ``x @ W.T`` for our float64 decode ``W`` on the CPU, both in eval mode with an input that
    does not require grad (bitsandbytes' inference path) and in training mode with one that does; else the reason
    to skip a comparison with bitsandbytes' forward."""
    import bitsandbytes as bnb
    from tiny_models import decode_4bit

    out_features, in_features = PROBE_SHAPE
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        _probe_weight(), requires_grad=False, quant_type="nf4", blocksize=PROBE_BLOCKSIZE, module=layer
    )._quantize("cpu")
    decoded = decode_4bit(layer.weight.data, layer.weight.quant_state)  # before any forward can repack it
    x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(1))
    expected = x.double() @ decoded.T
    problems = []
    for mode in ("training (input requires grad)", "inference (eval mode, no grad)"):
        training = mode.startswith("training")
        layer.train(training)
        try:
            with torch.set_grad_enabled(training):
                out = layer(x.clone().requires_grad_(training))
        except Exception as error:  # noqa: BLE001  (any failure of bitsandbytes' forward is the defect)
            problems.append(f"{mode} raises {type(error).__name__}: {error}")
            continue
        if not _rel(out, expected) <= GROSS:
            problems.append(f"{mode} is {_rel(out, expected):.0%} off x @ W.T for peft-sparse's float64 decode W")
    if not problems:
        return None
    return (
        f"bitsandbytes defect on this CPU ({_platform()}): Linear4bit.forward on a 4-bit layer whose in_features "
        f"is not a multiple of the blocksize; probe (64x32 NF4, blocksize 64): " + "; ".join(problems)
    )
