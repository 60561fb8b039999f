"""Salience metrics (SPEFT, arXiv 2412.13488, section 3): which entries of each targeted weight are worth training.

Every metric is a small function of named per-layer tensors, all in the logical ``(out, in)`` layout, which it
may overwrite (they are the layer's accumulators and a fresh weight copy, dead once it is scored: computing the
score in place keeps scoring to no more than one dense layer-sized buffer besides them):

* ``weight`` -- the frozen base weight ``W`` (dequantised for quantised bases), as fp32;
* ``grad`` -- ``G = sum_b g_b``, the dense gradient of the loss w.r.t. ``W`` summed over the salience batches;
* ``grad_square`` -- ``sum_b g_b**2``, the per-batch squared gradients (Fisher);
* ``hessian_grad`` -- ``H G``, a Hessian-vector product (GRaSP);
* ``shape``, ``device`` -- the layer's logical ``(out, in)`` shape and its weight's device;
* ``generator`` -- a seeded ``torch.Generator`` for the layer (random).

Higher score = more salient; every metric is oriented so. Signs and absolute values follow the papers:

========== =========================== ==========================================================================
metric     score                       convention
========== =========================== ==========================================================================
magnitude  ``|W|``                     data-free; large weights matter
gradient   ``|G|``                     magnitude of the *accumulated* gradient (sum first, then ``abs``), as
                                       SPEFT's code does: entries whose gradient is consistently large. The
                                       default (see below).
relative_  ``|G| / (r ⊗ c)``           ``|G|`` relative to its row's and column's root-mean-square (``r_i``,
gradient                               ``c_j``): what the rank-one "row scale × column scale" part of ``|G|``
                                       does not explain. See below.
snip       ``|G * W|``                 connection sensitivity, first-order loss change of removing the weight
force      ``-(G * W)``                signed: FORCE as specified for this package keeps entries whose removal
                                       would raise the loss the most when moving against the gradient
taylor_fo  ``(G * W)**2``              squared first-order Taylor term
grasp      ``-(H G) * W``              GRaSP: entries whose removal least reduces gradient flow score lowest
fisher     ``sum_b g_b**2``            empirical Fisher, per-batch approximation of per-example squares
synflow    ``dR/d|W| * |W|``          data-free, R = 1^T (linearised network) 1; always >= 0
random     ``U[0, 1)``                 seeded per layer from the config seed and the layer name
========== =========================== ==========================================================================

``gradient`` and ``relative_gradient``: ``|G|`` is dominated by a few rows (outputs with large gradients) and
columns (inputs with large activations), so the plain gradient mask piles its entries into them (on SmolLM2-135M, the
chosen entries' input columns have 2.9x the average activation RMS, and 16 % of the entries sit in 1 % of the
columns). An AdamW step moves every trained entry by about the learning rate, with the sign of its gradient, so
entries that share a row add up coherently in that row's output: the gradient mask takes a rate about 10x lower than
a random mask's (1e-3 against 1e-2). Dividing by the row and column scales (``relative_gradient``) removes that part
(for a rank-one ``|G| = u vᵀ`` every score ties) and spreads the entries, but it lifts the quiet rows and columns,
where a small ``|G|`` is large only relative to a smaller scale and is mostly the noise of the salience batches: its
entries hold less of the held-out gradient than a random mask's (1.4 % against 2.3 %, where ``gradient``'s hold
57 %), and two sets of salience batches choose masks that share 7 % of their entries (``gradient``: 44 %). It buys
capacity (memorising, learning arbitrary facts) and pays in generalisation; on the task suite's tuning tasks
(``benchmarks/suite.py``) ``gradient`` with the same density per layer is the better default. ``relative_gradient``
costs two vectors per layer (``out + in`` floats) and no layer-sized temporary.

``synflow`` scores ``(dR/dW) * |W|`` on the linearised network (all parameters replaced by their absolute value,
an all-ones input, R = the sum of the outputs; see :func:`peft_sparse.selection.synflow.synflow_statistics` for the numerical safety and how
the model is restored exactly): data-free, one forward and backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["METRICS", "GradientProbe", "Metric"]


@dataclass(frozen=True)
class Metric:
    """A salience metric: what statistics it needs and how it scores a layer."""

    name: str
    needs_data: bool
    needs_grad_square: bool
    needs_hessian: bool
    needs_weight: bool
    score: Callable[..., torch.Tensor]


def _magnitude(weight, **_):
    return weight.abs_()


def _gradient(grad, **_):
    return grad.abs_()


def _relative_gradient(grad, **_):
    score = grad.abs_()
    # Row and column root-mean-squares of |G|, both of the original |G| (one step of a two-sided normalisation: a
    # rank-one |G| maps to a constant). vector_norm reduces without a layer-sized temporary.
    tiny = torch.finfo(score.dtype).tiny
    rows = torch.linalg.vector_norm(score, dim=1, keepdim=True).div_(score.shape[1] ** 0.5).clamp_min_(tiny)
    cols = torch.linalg.vector_norm(score, dim=0, keepdim=True).div_(score.shape[0] ** 0.5).clamp_min_(tiny)
    return score.div_(rows).div_(cols)


def _snip(weight, grad, **_):
    return grad.mul_(weight).abs_()


def _force(weight, grad, **_):
    return grad.mul_(weight).neg_()


def _taylor_fo(weight, grad, **_):
    return grad.mul_(weight).square_()


def _grasp(weight, hessian_grad, **_):
    return hessian_grad.mul_(weight).neg_()


def _fisher(grad_square, **_):
    return grad_square


def _synflow(weight, grad, **_):
    return grad.mul_(weight)


def _random(shape, device, generator, **_):
    return torch.rand(shape, generator=generator).to(device)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("magnitude", False, False, False, True, _magnitude),
        Metric("gradient", True, False, False, False, _gradient),
        Metric("relative_gradient", True, False, False, False, _relative_gradient),
        Metric("snip", True, False, False, True, _snip),
        Metric("force", True, False, False, True, _force),
        Metric("taylor_fo", True, False, False, True, _taylor_fo),
        Metric("grasp", True, False, True, True, _grasp),
        Metric("fisher", True, True, False, False, _fisher),
        Metric("synflow", False, False, False, True, _synflow),
        Metric("random", False, False, False, False, _random),
    )
}


class GradientProbe:
    """Accumulates one layer's dense weight gradient from inside the layer's backward.

    Installed as ``layer.salience_probe`` while salience is estimated; :func:`peft_sparse.ops.sparse_linear` calls
    :meth:`accumulate` with the layer's output gradient and input, so no dense gradient exists outside this object
    and the base weight may be stored in any form (quantised included).

    Args:
        shape: the logical ``(out, in)`` shape.
        dtype: accumulation dtype (fp32 by default; the compute dtype halves the memory at some precision cost).
        device: where the accumulators live.
        keep_square: also keep ``sum_b g_b**2`` (Fisher); needs a per-batch buffer besides the sum.
    """

    def __init__(self, shape, dtype: torch.dtype, device, keep_square: bool = False) -> None:
        self.dtype = dtype
        self.grad = torch.zeros(shape, dtype=dtype, device=device)
        self.grad_square = torch.zeros(shape, dtype=dtype, device=device) if keep_square else None
        self._batch = torch.zeros(shape, dtype=dtype, device=device) if keep_square else None
        self.weight_offset: torch.Tensor | None = None
        # A pass whose forward ran the layer but whose backward never reached it would leave ``grad`` all zeros and
        # the layer's mask to tie-breaks: the passes count both sides (and forwards run with autograd off, which a
        # reentrant checkpoint replays in the backward) to refuse that.
        self.forward_calls = 0
        self.forward_calls_without_grad = 0
        self.backward_calls = 0

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.grad, self.grad_square, self._batch, self.weight_offset) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def record_forward(self) -> None:
        self.forward_calls += 1
        if not torch.is_grad_enabled():
            self.forward_calls_without_grad += 1

    def accumulate(self, grad_output_2d: torch.Tensor, input_2d: torch.Tensor) -> None:
        self.backward_calls += 1
        target = self._batch if self._batch is not None else self.grad
        target.addmm_(grad_output_2d.t().to(self.dtype), input_2d.to(self.dtype))

    def end_batch(self) -> None:
        if self._batch is not None:
            self.grad += self._batch
            self.grad_square.addcmul_(self._batch, self._batch)
            self._batch.zero_()
