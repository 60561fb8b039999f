"""Optimizers that know where each sparse value sits in its layer's dense weight.

:class:`SM3` is SM3-II (Anil et al., 2019, "Memory-Efficient Adaptive Optimization") for sparse adapter values.
For a values tensor of a layer with an ``(out, in)`` weight it keeps one accumulator per row and one per column
(``O(out + in)`` memory) and updates the entry at ``(r, c)`` with

    nu = beta * min(row[r], col[c]) + (1 - beta) * g**2        (beta = 0: SM3-II's running sum)
    row[r] = max(row[r], max of nu over the row's entries)      (likewise col[c])
    value -= lr * g / sqrt(nu + eps)                            (with optional momentum on that step)

SpIEL-MA (:class:`peft_sparse.selection.spiel.SpIEL` with ``regrow="momentum"``) scores an inactive entry
``(r, c)`` by ``row[r] * col[c]``: an estimate of its momentum that costs no dense gradient.

Why a new implementation: existing SM3 optimizers see each parameter as its own tensor, so for a sparse adapter
they see only the flat, 1-D values and keep one statistic per value; they cannot know which dense row and column
each value belongs to, and so can supply neither the shared row/column statistics that make SM3 cheap here nor the
scores SpIEL-MA needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._distributed import is_sharded, local_part, whole

__all__ = ["SM3"]


class SM3(torch.optim.Optimizer):
    """SM3-II over the sparse values of a peft-sparse model (and plain SM3 over any other trainable tensor).

    Args:
        model: the peft model (or the sparse-adapted module). Its trainable parameters are optimised: the sparse
            values of ``adapter_name`` with row/column accumulators over their layer's dense positions, any other
            trainable tensor (e.g. ``modules_to_save``) with one accumulator per dimension, as SM3 does.
        lr: learning rate.
        momentum: momentum on the preconditioned step (0 disables it and its per-entry buffer).
        beta: exponential decay of the accumulators (0: SM3-II's sum of squares).
        eps: added to the accumulator before the square root.
        adapter_name: the sparse adapter (default: the active one).

    When SpIEL moves an entry, :func:`peft_sparse.selection.reassign_entries` remaps the per-entry momentum and
    leaves the row/column accumulators alone (they describe positions, not entries): see
    :attr:`position_indexed_state`.
    """

    position_indexed_state = ("row_accumulator", "col_accumulator")

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.0,
        beta: float = 0.0,
        eps: float = 1e-8,
        adapter_name: str | None = None,
    ) -> None:
        for name, value, low, high in (
            ("lr", lr, 0.0, None),
            ("momentum", momentum, 0.0, 1.0),
            ("beta", beta, 0.0, 1.0),
            ("eps", eps, 0.0, None),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"SM3: {name} must be a float, got {value!r}")
            if value < low or (high is not None and value >= high):
                raise ValueError(
                    f"SM3: {name} must be in [{low}, {high if high is not None else 'inf'}), got {value!r}"
                )
        if not isinstance(model, nn.Module):
            raise TypeError(f"SM3: expected the peft model (an nn.Module), got {type(model).__name__}")
        from .tuner.lookup import resolve_adapter, sparse_layers

        _, adapter_name, _ = resolve_adapter(model, adapter_name, "SM3")
        self.adapter_name = adapter_name
        # The layers are looked up again at every step (cheap), so a values parameter that select_mask or an adapter
        # load replaced, and that was swapped into the parameter groups, is still matched with its layer.
        self._sparse_layers = [layer for _, layer in sparse_layers(model, adapter_name)]
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("SM3: the model has no trainable parameters")
        super().__init__(params, {"lr": lr, "momentum": momentum, "beta": beta, "eps": eps})

    def _layers_by_values(self) -> dict[int, Any]:
        return {
            id(layer.sparse_values[self.adapter_name]): layer
            for layer in self._sparse_layers
            if self.adapter_name in layer.sparse_values
        }

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layers = self._layers_by_values()
        for group in self.param_groups:
            lr, momentum, beta, eps = group["lr"], group["momentum"], group["beta"], group["eps"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                # Under FSDP2 a sharded parameter's statistics are computed over all of its entries (SM3's row
                # and column maxima span the whole layer): every rank gathers the gradient, runs the same
                # update on the whole tensor and applies its own chunk. The state is then whole on every rank.
                grad = whole(param.grad).float()
                state = self.state[param]
                layer = layers.get(id(param))
                if layer is not None:
                    nu = self._sparse_accumulate(state, layer, grad, beta)
                else:
                    nu = self._dense_accumulate(state, param, grad, beta)
                update = grad / (nu + eps).sqrt()
                if momentum > 0:
                    buffer = state.setdefault("momentum_buffer", torch.zeros_like(grad))
                    buffer.mul_(momentum).add_(update, alpha=1.0 - momentum)
                    update = buffer
                target = param.to_local() if is_sharded(param) else param
                target.add_(local_part(param, update).to(param.dtype), alpha=-lr)
                state["step"] = state.get("step", 0) + 1
        return loss

    def _sparse_accumulate(self, state, layer, grad, beta) -> torch.Tensor:
        out_features, in_features = layer.logical_shape
        if "row_accumulator" not in state:
            state["row_accumulator"] = torch.zeros(out_features, dtype=torch.float32, device=grad.device)
            state["col_accumulator"] = torch.zeros(in_features, dtype=torch.float32, device=grad.device)
        rows_acc, cols_acc = state["row_accumulator"], state["col_accumulator"]
        rows, cols = torch.unravel_index(layer.sparse_indices[self.adapter_name].to(torch.int64), layer.logical_shape)
        nu = torch.minimum(rows_acc[rows], cols_acc[cols])
        if beta > 0:
            nu.mul_(beta)
        nu.addcmul_(grad, grad, value=1.0 - beta)
        rows_acc.scatter_reduce_(0, rows, nu, reduce="amax", include_self=True)
        cols_acc.scatter_reduce_(0, cols, nu, reduce="amax", include_self=True)
        return nu

    @staticmethod
    def _dense_accumulate(state, param, grad, beta) -> torch.Tensor:
        # SM3 with one accumulator per dimension (a cover by all slices); a 1-D tensor gets a full accumulator.
        if "accumulators" not in state:
            state["accumulators"] = [torch.zeros(size, dtype=torch.float32, device=grad.device) for size in grad.shape]
        accumulators = state["accumulators"]
        if grad.dim() == 0:
            nu = grad.square()
            return nu
        nu = None
        for dim, acc in enumerate(accumulators):
            shape = [1] * grad.dim()
            shape[dim] = -1
            view = acc.view(shape)
            nu = view.expand_as(grad) if nu is None else torch.minimum(nu, view)
        nu = nu * beta + (1.0 - beta) * grad * grad if beta > 0 else nu + grad * grad
        for dim, acc in enumerate(accumulators):
            other = [d for d in range(grad.dim()) if d != dim]
            torch.maximum(acc, nu.amax(dim=other) if other else nu, out=acc)
        return nu
