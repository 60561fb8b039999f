"""SpIEL prune-and-regrow (Ansell et al. 2024, arXiv 2401.16405, section 3): ``update="spiel"``.

Every ``update_interval`` optimizer steps, in every sparse layer of the adapter:

1. **Prune** the ``n = floor(p * k)`` active entries whose deltas moved least since they were grown,
   ``|value - value_at_growth|`` (an O(k) record per layer; a regrown value starts at zero, so for most entries this
   is ``|value|``), where ``p`` is the prune fraction of the schedule below. Ties go to the lower position.
2. **Regrow** ``n`` inactive entries (never one that was active at this update):

   * ``regrow="gradient"`` (SpIEL-AG): by the magnitude of the gradient accumulated over the ``accumulation_steps``
     optimizer steps before the update. Only those steps pay for a dense gradient, and only layer by layer inside
     each sparse layer's backward (from its input and output gradient): on the first backward of the window each
     layer keeps its ``k`` inactive positions of largest ``|gradient|`` as candidates (O(k) memory), and every later
     backward of the window adds the gradient at those candidates through the sampled gather (no dense product).
     As in the reference implementation, a position that was not a candidate after the first backward of the
     window cannot be regrown at this update. Under ``torch.distributed`` both come from the global batch (see
     below), so N ranks regrow what one process on the whole batch (their micro-batches together) would.
   * ``regrow="momentum"`` (SpIEL-MA): by ``row[r] * col[c]``, the outer product of the row and column
     accumulators of :class:`peft_sparse.optim.SM3` (which must be the optimizer), with no dense gradient at all.

3. **Keep k**: indices are rewritten in place, sorted, by :func:`~peft_sparse.selection.reassign.reassign_entries`,
   so values and optimizer moments of surviving entries follow them and regrown entries start at zero (values and
   moments). The pruned deltas are dropped: that, and only that, changes the model's function at an update.

**Schedule.** The prune fraction at optimizer step ``t`` of a run of ``T`` steps is
``reselection_rate * 0.5 * (1 + cos(pi * t / T))`` for ``reselection_schedule="cosine"`` (the default: full rate at
the start, zero at the end), ``reselection_rate * (1 - t / T)`` for ``"linear"`` (the SpIEL reference code) or
``reselection_rate`` throughout for ``"constant"``. No update happens at or after step ``T``.

**Determinism.** Scores are ranked with :func:`~peft_sparse.selection.topk.select_top_k` and seeded tie-breaks,
so a run is reproducible for a given seed. Under ``torch.distributed`` (DDP, FSDP2) every rank computes the same
update from the same numbers, so no index set is broadcast: the values are read whole, the growth records are
identical, SpIEL-MA's SM3 statistics come from the gradients DDP/FSDP already averaged, and SpIEL-AG's statistics
are averaged over ranks (as DDP and FSDP average gradients) at two points:

* in the window's first backward, inside each sparse layer's backward, that layer's fp32 dense gradient, before the
  candidates are chosen: **4 * out * in bytes per layer, once per window** (a transient of one layer; every rank
  runs the same layers' backwards in the same order, so these all-reduces line up with DDP's and FSDP's own);
* after each later optimizer step of the window (in :meth:`SpIEL.step`), the gradient at the candidates that this
  rank's backwards added since the last step, for all layers in one all-reduce: **4 * c bytes per layer per step**,
  ``c = min(k, out * in - k)`` candidates.

So an update costs ``4 * (out * in + (accumulation_steps - 1) * c)`` bytes of all-reduce payload per layer (a ring
all-reduce moves about twice that per rank), SpIEL-MA nothing beyond the training's own all-reduces. The candidate
sums are reduced at every step of the window rather than only at the update so that between optimizer steps every
rank's :meth:`SpIEL.state_dict` is the global one: the Trainer callback saves it from rank 0 alone, and a run resumed
from a checkpoint inside the window continues exactly. (A state taken between a backward and :meth:`SpIEL.step` also
holds this rank's not yet reduced sums.)
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._distributed import whole, world_size
from ..ops import sddmm_gather
from ..tuner.config import SparseConfig
from ..tuner.indices import index_dtype, layer_seed
from ..tuner.lookup import resolve_adapter, sparse_layers
from .reassign import reassign_entries, surviving_positions, unwrap_optimizer
from .topk import select_top_k

__all__ = ["SpIEL", "SpielReport", "reselection_fraction"]


def reselection_fraction(step: int, total_steps: int, rate: float, schedule: str = "cosine") -> float:
    """The prune fraction at optimizer step ``step`` of ``total_steps`` (see the module docstring)."""
    if total_steps <= 0:
        raise ValueError(f"reselection_fraction: total_steps must be positive, got {total_steps!r}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "cosine":
        return rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return rate * (1.0 - progress)
    if schedule == "constant":
        return rate if progress < 1.0 else 0.0
    raise ValueError(f"reselection_fraction: schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")


@dataclass
class SpielReport:
    """What one SpIEL update did."""

    step: int
    fraction: float
    per_layer: dict[str, int] = field(default_factory=dict)  # entries pruned (= regrown) per layer
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.per_layer.values())


class _CandidateGradients:
    """SpIEL-AG's probe for one layer (installed as ``layer.salience_probe`` during the accumulation window).

    ``sums`` holds the global-batch gradient at the candidates accumulated so far (up to the last :meth:`SpIEL.step`
    under ``torch.distributed``, identical on every rank); there ``pending`` holds the gradient at the candidates
    this rank's backwards added since, which :func:`_flush_pending` averages over ranks once per optimizer step."""

    weight_offset = None  # the layer's forward reads this; SpIEL never perturbs the weight

    def __init__(self, layer, adapter_name: str, seed: int) -> None:
        self.layer = layer
        self.adapter_name = adapter_name
        self.seed = seed
        self.candidates: torch.Tensor | None = None  # sorted flat positions
        self.sums: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None

    def accumulate(self, grad_output_2d: torch.Tensor, input_2d: torch.Tensor) -> None:
        in_features = self.layer.in_features
        if self.candidates is None:
            # First backward of the window: one dense gradient, this layer only, to choose the candidates. Summed
            # over ranks (every rank runs the same layers' backwards in the same order, so these collectives line
            # up between DDP's and FSDP's own) and divided by the world size as DDP and FSDP average gradients: the
            # gradient of the global batch, what one process on the whole batch computes.
            dense = (grad_output_2d.t().float() @ input_2d.float()).reshape(-1)
            _mean_over_ranks(dense)
            active = self.layer.sparse_indices[self.adapter_name].to(torch.int64)
            magnitude = dense.abs()
            magnitude[active] = -1.0  # active positions cannot be regrown
            count = min(active.numel(), magnitude.numel() - active.numel())
            if count <= 0:
                self.candidates = active.new_empty(0)
                self.sums = dense.new_empty(0)
                return
            generator = torch.Generator().manual_seed(layer_seed(self.seed, self.layer.layer_name))
            chosen = select_top_k([magnitude], count, [generator], in_place=True)[0]
            self.candidates = chosen
            self.sums = dense[chosen].clone()
            return
        if self.candidates.numel():
            indices = self.candidates.to(index_dtype(self.layer.num_weight_entries))
            gathered = sddmm_gather(grad_output_2d, input_2d.to(grad_output_2d.dtype), indices, in_features).float()
            if world_size() == 1:
                self.sums += gathered
            else:  # this rank's part, summed over ranks at the end of the optimizer step
                self.pending = gathered if self.pending is None else self.pending.add_(gathered)


class SpIEL:
    """Drives SpIEL prune-and-regrow for one sparse adapter; call :meth:`step` after every optimizer step.

    The reports of the last :attr:`HISTORY_LENGTH` updates are kept in :attr:`history` (older ones are dropped, so
    a long run does not accumulate one per-layer report per update); :meth:`step` returns each as it happens.

    Args:
        model: the peft model with a sparse adapter whose config has ``update="spiel"``.
        optimizer: the optimizer training the values (its per-entry state is remapped at each update). For
            ``regrow="momentum"`` it must be a :class:`peft_sparse.optim.SM3` (possibly wrapped, e.g. by accelerate).
        num_training_steps: the run's length in optimizer steps (the schedule decays over it).
        adapter_name: the adapter (default: the active one).
        start_step: optimizer steps already done (a resumed run; then also :meth:`load_state_dict`).

    Example:
        ```py
        >>> spiel = SpIEL(model, optimizer, num_training_steps=1000)
        >>> for batch in loader:
        ...     model(**batch).loss.backward()
        ...     optimizer.step(); optimizer.zero_grad()
        ...     spiel.step()
        ```
    """

    HISTORY_LENGTH = 100

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        num_training_steps: int,
        adapter_name: str | None = None,
        start_step: int = 0,
    ) -> None:
        root, adapter_name, config = resolve_adapter(model, adapter_name, "SpIEL")
        if config.update != "spiel":
            raise ValueError(f"SpIEL: adapter {adapter_name!r} has update={config.update!r}; set update='spiel'")
        if isinstance(num_training_steps, bool) or not isinstance(num_training_steps, int) or num_training_steps < 1:
            raise ValueError(f"SpIEL: num_training_steps must be a positive int, got {num_training_steps!r}")
        if config.regrow == "momentum":
            from ..optim import SM3

            if not isinstance(unwrap_optimizer(optimizer), SM3):
                raise TypeError(
                    "SpIEL: regrow='momentum' (SpIEL-MA) scores entries with SM3's row and column statistics, so the "
                    f"optimizer must be peft_sparse.optim.SM3, got {type(optimizer).__name__}"
                )
        self.model = root
        self.optimizer = optimizer
        self.adapter_name = adapter_name
        self.config: SparseConfig = config
        self.num_training_steps = num_training_steps
        self.layers = sparse_layers(root, adapter_name)
        if not self.layers:
            raise ValueError(f"SpIEL: no sparse layer holds adapter {adapter_name!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"SpIEL: start_step must be a non-negative int, got {start_step!r}")
        self.completed_steps = start_step
        self.restart_growth_records()
        self.history: deque[SpielReport] = deque(maxlen=self.HISTORY_LENGTH)  # the latest updates' reports
        self._probing = False
        self._maybe_start_window()

    # --- schedule --------------------------------------------------------------------------------------------
    def _window_start(self) -> int:
        """Steps after an update at which SpIEL-AG starts recording gradients for the next one."""
        return self.config.update_interval - min(self.config.effective_accumulation_steps, self.config.update_interval)

    def _maybe_start_window(self) -> None:
        if self.config.regrow != "gradient" or self._probing:
            return
        next_update = (self.completed_steps // self.config.update_interval + 1) * self.config.update_interval
        if next_update >= self.num_training_steps:
            return  # no update will use it
        if self.completed_steps % self.config.update_interval == self._window_start():
            for _, layer in self.layers:
                layer.salience_probe = _CandidateGradients(
                    layer, self.adapter_name, self.config.seed + self.completed_steps
                )
            self._probing = True

    def _stop_window(self) -> dict[str, _CandidateGradients]:
        probes = {}
        for name, layer in self.layers:
            if isinstance(layer.salience_probe, _CandidateGradients):
                probes[name] = layer.salience_probe
                layer.salience_probe = None
        self._probing = False
        return probes

    def step(self) -> SpielReport | None:
        """Count one optimizer step; prune and regrow when an update is due. Returns the update's report, if any."""
        self.completed_steps += 1
        if self._probing:
            _flush_pending([layer.salience_probe for _, layer in self.layers])
        report = None
        if self.completed_steps % self.config.update_interval == 0 and self.completed_steps < self.num_training_steps:
            report = self.reselect()
        self._maybe_start_window()
        return report

    # --- the update --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reselect(self) -> SpielReport:
        """Prune and regrow now, at the schedule's fraction for the current step."""
        start = time.perf_counter()
        fraction = reselection_fraction(
            self.completed_steps,
            self.num_training_steps,
            self.config.reselection_rate,
            self.config.reselection_schedule,
        )
        probes = self._stop_window()
        _flush_pending(list(probes.values()))  # a no-op after step(); reselect() may also be called by hand
        report = SpielReport(self.completed_steps, fraction)
        for name, layer in self.layers:
            new_indices = self._reselect_layer(name, layer, fraction, probes.get(name))
            old = layer.sparse_indices[self.adapter_name].to(torch.int64)
            positions, survived = surviving_positions(old, new_indices)
            moved = int((~survived).sum())
            if moved:
                origin = torch.zeros_like(self.origins[name])  # regrown entries grow from zero
                origin[survived] = self.origins[name][positions[survived]]
                reassign_entries(layer, self.adapter_name, new_indices, self.optimizer)
                self.origins[name] = origin
            report.per_layer[name] = moved
        report.seconds = time.perf_counter() - start
        self.history.append(report)
        return report

    def _reselect_layer(self, name, layer, fraction, probe) -> torch.Tensor:
        """The layer's next index set (sorted, k entries; the current one when nothing moves)."""
        adapter = self.adapter_name
        indices = layer.sparse_indices[adapter].to(torch.int64)
        values = whole(layer.sparse_values[adapter].detach()).float()
        k = indices.numel()
        count = int(fraction * k)
        if count == 0:
            return indices.clone()
        regrow_scores, regrow_positions = self._regrow_scores(layer, indices, probe)
        count = min(count, regrow_scores.numel() if regrow_positions is None else regrow_positions.numel())
        if count == 0:
            return indices.clone()
        seed = self.config.seed + self.completed_steps
        # Prune: smallest movement since growth; a stable sort keeps ties in index order (lower positions first).
        movement = (values - self.origins[name].float()).abs()
        pruned = torch.sort(movement, stable=True).indices[:count]
        keep = torch.ones(k, dtype=torch.bool, device=indices.device)
        keep[pruned] = False
        generator = torch.Generator().manual_seed(layer_seed(seed, name))
        chosen = select_top_k([regrow_scores], count, [generator])[0].to(device=indices.device, dtype=torch.int64)
        grown = chosen if regrow_positions is None else regrow_positions[chosen]
        return torch.sort(torch.cat([indices[keep], grown])).values

    def _regrow_scores(self, layer, indices, probe) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores of the positions that may be regrown and those positions (flat, int64), or, for a dense score over
        the whole weight, ``None`` for the positions (score i is position i)."""
        if self.config.regrow == "gradient":
            if probe is None or probe.candidates is None or probe.candidates.numel() == 0:
                empty = indices.new_empty(0)
                return empty.float(), empty
            positions = probe.candidates.to(indices.device)
            _, active = surviving_positions(indices, positions)
            return probe.sums.abs()[~active], positions[~active]
        state = unwrap_optimizer(self.optimizer).state.get(layer.sparse_values[self.adapter_name], {})
        if "row_accumulator" not in state:  # SM3 has not stepped yet
            empty = indices.new_empty(0)
            return empty.float(), empty
        # One dense fp32 score per position of this layer, alive only while this layer is reselected.
        scores = torch.outer(state["row_accumulator"], state["col_accumulator"]).reshape(-1)
        scores[indices] = -1.0  # active positions cannot be regrown
        return scores, None

    # --- checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the schedule is, each entry's value at growth, and an open SpIEL-AG window's candidates and sums
        (indices and values live in the model, moments in the optimizer). Taken after :meth:`step` it is the same on
        every rank (no collective: rank 0 alone may call it)."""
        probes = None
        if self._probing:
            probes = {}
            for name, layer in self.layers:
                probe = layer.salience_probe
                probes[name] = {
                    "seed": probe.seed,
                    "candidates": None if probe.candidates is None else probe.candidates.clone(),
                    "sums": None if probe.sums is None else probe.sums.clone(),
                    "pending": None if probe.pending is None else probe.pending.clone(),
                }
        return {
            "completed_steps": self.completed_steps,
            "num_training_steps": self.num_training_steps,
            "origins": {name: tensor.clone() for name, tensor in self.origins.items()},
            "probes": probes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.origins) - set(state.get("origins", {}))
        if missing:
            raise ValueError(f"SpIEL.load_state_dict: no growth record for layers {sorted(missing)[:3]}")
        self._stop_window()
        self.completed_steps = int(state["completed_steps"])
        self.num_training_steps = int(state["num_training_steps"])
        for name in self.origins:
            self.origins[name] = state["origins"][name].to(self.origins[name].device)
        probes = state.get("probes")
        if probes is None:
            self._maybe_start_window()
            return
        for name, layer in self.layers:
            saved = probes[name]
            probe = _CandidateGradients(layer, self.adapter_name, int(saved["seed"]))
            device = layer.sparse_values[self.adapter_name].device
            if saved["candidates"] is not None:
                probe.candidates, probe.sums = saved["candidates"].to(device), saved["sums"].to(device)
            if saved.get("pending") is not None:
                probe.pending = saved["pending"].to(device)
            layer.salience_probe = probe
        self._probing = True

    def restart_growth_records(self) -> None:
        """Count every entry's movement from its current value (used at start, and when a resumed run has no saved
        SpIEL state). Gathers the values where FSDP2 shards them: a collective under ``torch.distributed``."""
        self.origins = {
            name: whole(layer.sparse_values[self.adapter_name].detach()).clone() for name, layer in self.layers
        }

    def close(self) -> None:
        """Remove any gradient probes (the run ended early)."""
        self._stop_window()


def _mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` replaced in place by its mean over ranks (a collective; nothing without torch.distributed). The
    sum is reduced once and shared, so every rank holds the same bits, as DDP's own gradient all-reduce assumes."""
    size = world_size()
    if size > 1:
        torch.distributed.all_reduce(tensor)
        tensor.div_(size)
    return tensor


def _flush_pending(probes: list[Any]) -> None:
    """Add every probe's ``pending`` gradient at its candidates, averaged over ranks, to its ``sums``: one
    all-reduce per device of all its layers' pending sums together (4 bytes per candidate)."""
    pending = [probe for probe in probes if isinstance(probe, _CandidateGradients) and probe.pending is not None]
    if world_size() == 1:
        for probe in pending:
            probe.sums += probe.pending
            probe.pending = None
        return
    by_device: dict[torch.device, list[_CandidateGradients]] = {}
    for probe in pending:  # in layer order, the same on every rank
        by_device.setdefault(probe.pending.device, []).append(probe)
    for group in by_device.values():
        flat = _mean_over_ranks(torch.cat([probe.pending for probe in group]))
        for probe, part in zip(group, flat.split([probe.pending.numel() for probe in group])):
            probe.sums += part
            probe.pending = None
