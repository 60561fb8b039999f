"""`SparseConfig`: the configuration of a sparse fine-tuning (SFT) adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft.config import PeftConfig

from .registration import SPARSE_PEFT_TYPE

SELECTION_METHODS = (
    "magnitude",
    "gradient",
    "relative_gradient",
    "snip",
    "force",
    "taylor_fo",
    "synflow",
    "grasp",
    "fisher",
    "random",
)
UPDATE_MODES = ("static", "dynamic", "spiel")
BUDGET_MODES = ("global", "local")
REGROW_METHODS = ("gradient", "momentum")
RESELECTION_SCHEDULES = ("cosine", "linear", "constant")
DELTA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SELECTION_ACCUMULATION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_ACCUMULATION_STEPS = 5  # SpIEL-AG's window when accumulation_steps is None (capped by update_interval)


def _check_choice(field_name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"SparseConfig.{field_name} must be one of {list(choices)}, got {value!r}")


def _check_int(field_name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"SparseConfig.{field_name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"SparseConfig.{field_name} must be >= {minimum}, got {value!r}")


def _check_positive_number(field_name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"SparseConfig.{field_name} must be a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"SparseConfig.{field_name} must be > 0, got {value!r}")


@dataclass
class SparseConfig(PeftConfig):
    """Configuration of a sparse fine-tuning adapter ([`SparseModel`]).

    Every targeted weight matrix ``W0`` (``out x in``) gets a trainable sparse delta: ``W = W0 + scatter(indices,
    values)`` with ``k`` entries per layer. Which entries are trainable is chosen by ``selection`` (SPEFT,
    arXiv 2412.13488) and may evolve during training (``update``; SpIEL, arXiv 2401.16405).

    Until a salience-based selection runs, every layer starts from a seeded uniform-random index set of its budgeted
    size, with all values zero (``init_weights=True``), so a fresh adapter is exactly the identity.

    Args:
        target_modules (`Optional[Union[list[str], str]]`):
            Names of the modules to adapt, a regex over full module names, or ``"all-linear"`` for every linear /
            ``Conv1D`` layer except the output head (as in LoRA). If ``None``, a default for known architectures is
            used.
        exclude_modules (`Optional[Union[list[str], str]]`):
            Names or a regex of modules not to adapt.
        layers_to_transform (`Optional[Union[list[int], int]]`):
            Only adapt the layers with these indices (requires a list ``target_modules``).
        layers_pattern (`Optional[Union[list[str], str]]`):
            Name of the module list holding the layers indexed by ``layers_to_transform`` (e.g. ``"layers"``).
        modules_to_save (`Optional[list[str]]`):
            Extra modules trained densely and saved with the adapter (e.g. a classification head).
        fan_in_fan_out (`bool`):
            Set to ``True`` when the targeted layers store their weight as ``(in, out)`` (GPT-2 ``Conv1D``). The
            layer's type decides: a value that disagrees with it is corrected, with a warning, as LoRA does.
            Indices always address the logical ``(out, in)`` weight.
        density (`float`):
            Fraction of the targeted weights that are trainable, in ``(0, 1]``.
        num_tunable_weights (`Optional[int]`):
            Absolute number of trainable weights over all targeted layers; overrides ``density``. See
            :func:`peft_sparse.lora_equivalent_budget` to match a LoRA rank.
        budget (`str`):
            ``"local"`` (default): the same density in every layer, as LoRA gives every layer the same rank;
            ``"global"``: one top-k over all targeted weights (layers get different ``k``; SPEFT's choice with
            ``selection="gradient"``). Never global with ``relative_gradient``: that score is scale-free per layer,
            so a global top-k over it compares layers by the shape of their score distributions, not by their
            importance (some layers of SmolLM2 got no entry, others 58 % of their weights; WordNet SFT lost 0.4
            nats).
        selection (`str`):
            Salience metric that chooses the trainable entries: ``"gradient"`` (default; SPEFT's ``|G|``, the
            magnitude of the gradient accumulated over ``salience_batches`` batches; with the local budget it had
            the smallest worst gap to LoRA over the tuning tasks of ``benchmarks/suite.py``, best near a learning
            rate of 1e-3), ``relative_gradient`` (``|G|`` over its row and column RMS: more capacity at high rates,
            but it chooses entries no held-out text pulls on; see `benchmarks/RESULTS.md`), ``magnitude``,
            ``snip``, ``force``, ``taylor_fo``, ``synflow``, ``grasp``, ``fisher``, ``random`` (no salience pass;
            wants a rate near 1e-2).
        update (`str`):
            ``"static"`` (select once), ``"dynamic"`` (reselect by salience every ``update_interval`` steps) or
            ``"spiel"`` (SpIEL prune and regrow every ``update_interval`` steps).
        update_interval (`int`):
            Optimizer steps between mask updates for ``update="dynamic"`` and ``"spiel"``.
        salience_batches (`int`):
            Number of batches over which salience is estimated; each costs about a training step (a forward and a
            backward). 16 (default): on SmolLM2-135M its mask shares 91 % of its entries with a 64-batch mask and
            holds as much of the held-out gradient (64.9 % against 65.2 %; `benchmarks/salience_batches.py`), at a
            quarter of the cost: 16 step equivalents, under the 5 % of a 1,000-step run that selection may take.
        selection_max_memory (`Optional[int]`):
            Bytes that mask selection (``select_mask``, and ``update_mask`` for ``update="dynamic"``) may hold beyond
            the model and one batch's activations: its dense gradient accumulators (4 bytes per weight of the layers
            scored in one pass), one layer's scoring temporaries and the top-k's chosen entries. Layers are scored in
            groups that fit, one pass over the salience batches per group; the chosen mask does not depend on it.
            ``None`` (default): one pass wherever half of the memory the device has free (``MemAvailable`` on a CPU,
            ``torch.cuda.mem_get_info`` on a GPU; the least over ranks) holds every layer's accumulators; where it
            does not, what is free less a salience batch's forward and backward (measured on one batch) and a tenth,
            but never less than the candidates plus 12 bytes per entry (what training adds), at least 64 MiB, and
            the largest layer, and a warning says how many passes that costs and
            which value gives one pass (see :func:`peft_sparse.selection.select.default_max_memory`). A value too
            small for the largest layer is refused at selection, naming the smallest workable one.
        selection_accumulation_dtype (`str`):
            Dtype of selection's dense gradient accumulators: ``"float32"`` (default, 4 bytes per weight scored in a
            pass) or ``"bfloat16"`` (2 bytes: half the memory, so where memory is tight half the passes over the
            salience batches). Each batch's gradient is rounded to bfloat16 and added in bfloat16: a sum of ``n``
            batches is off by at most about ``n * 2**-8`` of the sum of their magnitudes, which reorders entries
            whose scores lie that close (see ``benchmarks/salience_batches.py --bfloat16`` for the measured effect
            on the mask).
        regrow (`str`):
            SpIEL regrowth criterion: ``"gradient"`` (accumulated gradients, SpIEL-AG) or ``"momentum"``
            (SM3-approximated momenta, SpIEL-MA).
        reselection_rate (`float`):
            Fraction of each layer's entries pruned and regrown at a SpIEL update (decayed over training), in
            ``[0, 1]``.
        reselection_schedule (`str`):
            How the SpIEL prune fraction decays from ``reselection_rate`` over the run: ``"cosine"`` (default, to zero
            at the last step), ``"linear"`` (to zero, as the SpIEL reference code) or ``"constant"``.
        accumulation_steps (`Optional[int]`):
            SpIEL-AG: number of steps before an update over which dense gradients are accumulated, at most
            ``update_interval``. ``None`` (default): ``min(5, update_interval)`` (:attr:`effective_accumulation_steps`).
        delta_dtype (`Optional[str]`):
            Dtype of the trainable values. ``None`` (default) follows peft's rule for every tuner: float32 when the
            adapter is created or loaded with ``autocast_adapter_dtype=True`` (peft's default), else the base layer's
            dtype (float32 over quantised layers). ``"float32"``, ``"bfloat16"`` or ``"float16"`` pins the dtype:
            it wins over ``autocast_adapter_dtype`` and over the base model's dtype, and survives loading with
            ``low_cpu_mem_usage=True``.
        init_weights (`bool`):
            ``True`` (default): every value starts at zero, so a fresh adapter is exactly the identity. ``False``:
            values start as seeded draws from ``N(0, 1 / in_features)``, a non-identity adapter (as ``init_weights=
            False`` in LoRA, SHiRA or Super-Tuning), meant for tests of merging, saving and loading.
        seed (`int`):
            Seed for random index sets, ``init_weights=False`` values and deterministic tie-breaking.
        r (`int`):
            Rank of an optional low-rank term added to every sparse layer (the sparse + low-rank hybrid of RoSA,
            arXiv 2401.04679; "Supra" in peft's Super-Tuning): the delta becomes ``scatter(indices, values) +
            (lora_alpha / r) * B @ A`` with ``A`` (``r x in``) initialised as in LoRA and ``B`` (``out x r``) zero.
            ``0`` (default) means no low-rank term. ``density`` / ``num_tunable_weights`` count the sparse entries
            only; the low-rank term adds ``r * (in + out)`` per layer.
        lora_alpha (`float`):
            Scale of the low-rank term (``lora_alpha / r``), as LoRA's ``lora_alpha``.
        low_rank_lr_ratio (`float`):
            The low-rank term's learning rate over the sparse values' (default 3), for Adam-type optimizers,
            whose steps do not depend on the gradient's scale: the factors are stored divided by the ratio ``c`` and
            the term's scale is multiplied by ``c**2``, so ``B @ A`` is the same function and each of its factors
            moves ``c`` times as far per step, with any optimizer and trainer (with plain SGD, ``c**2`` times). The
            two kinds of trainables have different best rates: on every tuning task of the project's suite
            (``benchmarks/suite.py``) LoRA is best at 3x a sparse gradient mask's rate, and the hybrid at ratio 3
            beat the same hybrid at one rate (German quotations 3.616 against 3.672). ``1`` trains both at one
            rate, as 0.1.0 did (adapters saved by 0.1.0 load with 1). Ignored when ``r = 0``.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "List of module names or a regex over module names to adapt, or 'all-linear' for every linear/Conv1D "
                "layer except the output head. For example ['q_proj', 'v_proj'] or '.*decoder.*(q|v)_proj$'."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "List of module names or a regex over module names not to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Only adapt the layers with these indices. Requires `target_modules` to be a list."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the module list that `layers_to_transform` indexes, e.g. 'layers' or 'h'."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "Modules besides the sparse layers to train densely and save with the adapter, e.g. a freshly "
                "initialised classification head."
            )
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "Set to True if the targeted layers store their weight as (in, out), like GPT-2 Conv1D."},
    )
    density: float = field(
        default=0.01, metadata={"help": "Fraction of the targeted weights that are trainable, in (0, 1]."}
    )
    num_tunable_weights: int | None = field(
        default=None,
        metadata={"help": "Absolute number of trainable weights over all targeted layers; overrides `density`."},
    )
    budget: Literal["global", "local"] = field(
        default="local",
        metadata={"help": "'local': the same density in every layer; 'global': one top-k over all targeted weights."},
    )
    selection: Literal[
        "magnitude",
        "gradient",
        "relative_gradient",
        "snip",
        "force",
        "taylor_fo",
        "synflow",
        "grasp",
        "fisher",
        "random",
    ] = field(
        default="gradient",
        metadata={"help": f"Salience metric choosing the trainable entries: {SELECTION_METHODS}."},
    )
    update: Literal["static", "dynamic", "spiel"] = field(
        default="static",
        metadata={"help": "'static' (select once), 'dynamic' (reselect every `update_interval` steps) or 'spiel'."},
    )
    update_interval: int = field(
        default=20, metadata={"help": "Optimizer steps between mask updates for update='dynamic' or 'spiel'."}
    )
    salience_batches: int = field(
        default=16,
        metadata={
            "help": "Number of batches to estimate salience over (one forward and backward each, about a training "
            "step)."
        },
    )
    selection_max_memory: int | None = field(
        default=None,
        metadata={
            "help": (
                "Bytes mask selection may hold besides the model and one batch's activations (gradient accumulators, "
                "scores, top-k candidates); layers are scored in groups that fit, one pass over the salience batches "
                "each (the same mask). None: one pass where half the device's free memory allows, else that half "
                "(at least the candidates plus 12 bytes per entry, 64 MiB), with a warning that names the cost."
            )
        },
    )
    selection_accumulation_dtype: Literal["float32", "bfloat16"] = field(
        default="float32",
        metadata={
            "help": "Dtype of selection's gradient accumulators: 'float32', or 'bfloat16' (half the memory, so half "
            "the passes where memory is tight, at the cost of bf16 rounding in the sums)."
        },
    )
    regrow: Literal["gradient", "momentum"] = field(
        default="gradient",
        metadata={"help": "SpIEL regrowth: 'gradient' (accumulated gradients) or 'momentum' (SM3 momenta)."},
    )
    reselection_rate: float = field(
        default=0.2, metadata={"help": "Fraction of entries pruned and regrown at a SpIEL update, in [0, 1]."}
    )
    reselection_schedule: Literal["cosine", "linear", "constant"] = field(
        default="cosine",
        metadata={"help": "Decay of the SpIEL prune fraction over the run: 'cosine', 'linear' or 'constant'."},
    )
    accumulation_steps: int | None = field(
        default=None,
        metadata={
            "help": "SpIEL-AG: steps before an update over which dense gradients are accumulated, at most "
            f"update_interval; None: min({DEFAULT_ACCUMULATION_STEPS}, update_interval)."
        },
    )
    delta_dtype: Literal["float32", "bfloat16", "float16"] | None = field(
        default=None,
        metadata={
            "help": (
                "Dtype of the trainable values. None: float32 with autocast_adapter_dtype=True (peft's default), else "
                "the base layer's dtype. 'float32', 'bfloat16' or 'float16' pins it, whatever the base model and "
                "autocast_adapter_dtype."
            )
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True: values start at zero (the adapter is the identity). False: seeded non-zero values (a "
                "non-identity adapter, for tests)."
            )
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed for random index sets, init_weights=False values and tie-breaking."}
    )
    r: int = field(
        default=0,
        metadata={
            "help": (
                "Rank of a low-rank term added to every sparse layer (sparse + low-rank hybrid, RoSA); 0: none. "
                "density / num_tunable_weights count the sparse entries only."
            )
        },
    )
    lora_alpha: float = field(default=8, metadata={"help": "Scale of the low-rank term: lora_alpha / r (as in LoRA)."})
    low_rank_lr_ratio: float = field(
        default=3.0,
        metadata={
            "help": (
                "The low-rank term's learning rate over the sparse values' (Adam-type optimizers), by "
                "reparametrisation: factors stored / ratio, scale x ratio**2."
            )
        },
    )

    @classmethod
    def check_kwargs(cls, **kwargs):
        """peft's hook on a saved config's fields before loading: an adapter saved before ``low_rank_lr_ratio``
        existed stored its low-rank factors unscaled, so it loads with the ratio 1 whatever today's default is."""
        kwargs = super().check_kwargs(**kwargs)
        kwargs.setdefault("low_rank_lr_ratio", 1.0)
        return kwargs

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SPARSE_PEFT_TYPE
        self.validate()
        self.target_modules = (
            set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        )
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first invalid field and its value."""
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list, set, tuple)):
                raise TypeError(f"SparseConfig.{name} must be a str, a list of str or None, got {value!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("SparseConfig.layers_to_transform cannot be used when target_modules is a str (regex)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("SparseConfig.layers_pattern requires layers_to_transform to be set")
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise TypeError(
                f"SparseConfig.density must be a float, got {type(self.density).__name__} {self.density!r}"
            )
        if not (math.isfinite(self.density) and 0.0 < self.density <= 1.0):
            raise ValueError(f"SparseConfig.density must be in (0, 1], got {self.density!r}")
        if self.num_tunable_weights is not None:
            # An adapter with nothing to train is never what the user meant: refuse it rather than train nothing.
            _check_int("num_tunable_weights", self.num_tunable_weights, 1)
        _check_choice("budget", self.budget, BUDGET_MODES)
        _check_choice("selection", self.selection, SELECTION_METHODS)
        _check_choice("update", self.update, UPDATE_MODES)
        _check_choice("regrow", self.regrow, REGROW_METHODS)
        _check_choice("selection_accumulation_dtype", self.selection_accumulation_dtype, SELECTION_ACCUMULATION_DTYPES)
        _check_choice("reselection_schedule", self.reselection_schedule, RESELECTION_SCHEDULES)
        if self.delta_dtype is not None:
            _check_choice("delta_dtype", self.delta_dtype, DELTA_DTYPES)
        if not isinstance(self.init_weights, bool):
            raise TypeError(f"SparseConfig.init_weights must be a bool, got {self.init_weights!r}")
        _check_int("update_interval", self.update_interval, 1)
        _check_int("salience_batches", self.salience_batches, 1)
        if self.selection_max_memory is not None:
            _check_int("selection_max_memory", self.selection_max_memory, 1)
        if self.accumulation_steps is not None:
            _check_int("accumulation_steps", self.accumulation_steps, 1)
        _check_int("seed", self.seed, 0)
        _check_int("r", self.r, 0)
        _check_positive_number("lora_alpha", self.lora_alpha)
        _check_positive_number("low_rank_lr_ratio", self.low_rank_lr_ratio)
        if isinstance(self.reselection_rate, bool) or not isinstance(self.reselection_rate, (int, float)):
            raise TypeError(f"SparseConfig.reselection_rate must be a float, got {self.reselection_rate!r}")
        if not (math.isfinite(self.reselection_rate) and 0.0 <= self.reselection_rate <= 1.0):
            raise ValueError(f"SparseConfig.reselection_rate must be in [0, 1], got {self.reselection_rate!r}")
        if (
            self.update == "spiel"
            and self.accumulation_steps is not None
            and self.accumulation_steps > self.update_interval
            and self.regrow == "gradient"
        ):
            raise ValueError(
                f"SparseConfig.accumulation_steps ({self.accumulation_steps}) must not exceed update_interval "
                f"({self.update_interval}) for update='spiel' with regrow='gradient'"
            )

    @property
    def effective_accumulation_steps(self) -> int:
        """``accumulation_steps``, or where it is ``None``, ``min(DEFAULT_ACCUMULATION_STEPS, update_interval)``."""
        if self.accumulation_steps is not None:
            return self.accumulation_steps
        return min(DEFAULT_ACCUMULATION_STEPS, self.update_interval)

    @property
    def torch_selection_accumulation_dtype(self) -> torch.dtype:
        """``selection_accumulation_dtype`` as a ``torch.dtype``."""
        return SELECTION_ACCUMULATION_DTYPES[self.selection_accumulation_dtype]

    @property
    def torch_delta_dtype(self) -> torch.dtype | None:
        """``delta_dtype`` as a ``torch.dtype``, or ``None`` when it is left to peft's dtype rule."""
        return None if self.delta_dtype is None else DELTA_DTYPES[self.delta_dtype]
