"""Why a gradient-chosen sparse mask learns slower than LoRA: where its entries sit, and which changes of the score
let it take a higher rate. The evidence behind the `relative_gradient` score, and why it was dropped as the default.

    python benchmarks/mask_diagnosis.py stats                          # where each mask puts its entries
    python benchmarks/mask_diagnosis.py probe gradient:1e-2 relative_gradient:1e-2 lora:3e-3 ...

`stats`: on SmolLM2-135M-Instruct with LoRA r=8's count and the salience batches of the probe, for each mask: the
input-activation RMS of the chosen entries' columns relative to their layer's mean column (a value of 1 means no
preference), the share of the entries in the busiest 1 % of columns, the busiest row's count over the mean row's, and
the range of per-layer densities.

`probe`: a short memorisation probe, a plain PyTorch loop (no Trainer, so it is quick): 64 Italian quotations
(Debian `fortunes-it`), 6 epochs of batches of 8 (48 steps), AdamW with linear decay, loss on those texts (fit) and
on 64 English quotations (Debian `fortunes`, `wisdom`; forgetting). Each argument is `MASK:LR`, where MASK is a
`SparseConfig.selection`, `lora`, or one of the score variants below, which replace the gradient metric's score
for that run only; a `/local` suffix (`relative_gradient/local:1e-2`) selects with `budget="local"`:

* `column_rms`: |G| divided by the RMS of its column's input activations;
* `sqrt_row_col`: |G| divided by the square root of its row's and column's RMS of |G| (half of `relative_gradient`).

`transfer TASK`: for a text task of `suite.py` (`quotes_de`, `quotes_it`, `memorise`), the dense gradient of the
linear weights summed over two disjoint sets of 4 training batches (A: texts 0-31, B: 32-63) and over the validation
texts; for each score, the per-layer (local) top-k at LoRA r=8's density from A and from B, and: the overlap of the
two masks (random: the density), the share of A's squared gradient the A-mask holds, the shares of the held-out
gradient (squared and absolute) it holds (random: the density), the busiest row's count over the mean row's and the
share of entries in the busiest 1 % of columns. A mask that holds little of the held-out gradient chose entries that
matter only for the batches it was scored on. Scores: `gradient`, `relative_gradient`, `sqrt_row_col` (as above),
`consistency` (|sum g| / sqrt(sum g^2) over the 4 batches), `adam_gain` (|sum g|^2 / sqrt(sum g^2)) and
`row_balanced` (the gradient's top entries of each row, the same number per row).

`benchmarks/capacity.py` is the full benchmark (SFTTrainer, the callback, 96 steps, rate grids, seeds); this script
is the quick look that found what to put in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
import warnings
from pathlib import Path

import torch

ITALIAN = Path("/usr/share/games/fortunes/it/italia")
ENGLISH = Path("/usr/share/games/fortunes/wisdom")
VARIANTS = ("column_rms", "sqrt_row_col", "row_balanced", "adam_gain", "mixed")
# the share of a ``mixed`` mask that the gradient chooses (the rest is random)
MIXED_GRADIENT_SHARE = 0.5


def quotations(path: Path, count: int, max_chars: int = 200) -> list[str]:
    texts = [t.strip() for t in path.read_text(encoding="latin-1").split("\n%\n")]
    texts = [t for t in texts if 30 < len(t) < max_chars]
    random.Random(0).shuffle(texts)
    return texts[:count]


class Probe:
    def __init__(self) -> None:
        from peft_sparse.cli import models

        self.source = models.as_folder(models.resolve("smollm2"))
        self.tokenizer = models.load_tokenizer(self.source)
        self.tokenizer.pad_token = self.tokenizer.pad_token or self.tokenizer.eos_token
        self.train = quotations(ITALIAN, 64)
        self.english = quotations(ENGLISH, 64)

    def batches(self, texts: list[str], size: int):
        for start in range(0, len(texts), size):
            encoded = self.tokenizer(
                texts[start : start + size], return_tensors="pt", padding=True, truncation=True, max_length=64
            )
            yield {**encoded, "labels": encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)}

    @torch.no_grad()
    def loss(self, model, texts: list[str]) -> float:
        model.eval()
        total = tokens = 0
        for batch in self.batches(texts, 16):
            count = (batch["labels"][:, 1:] != -100).sum().item()
            total += model(**batch).loss.item() * count
            tokens += count
        model.train()
        return total / tokens

    def model(self, mask: str, seed: int = 0):
        import transformers
        from peft import LoraConfig, get_peft_model

        import peft_sparse

        transformers.set_seed(seed)
        base = transformers.AutoModelForCausalLM.from_pretrained(
            self.source.path, dtype=torch.float32, local_files_only=True
        )
        if mask == "lora":
            config = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=8, lora_alpha=16)
            return get_peft_model(base, config)
        budget = peft_sparse.lora_equivalent_budget(base, r=8, target_modules="all-linear")
        mask, _, scope = mask.partition("/")
        selection = "gradient" if mask in VARIANTS else mask
        config = peft_sparse.SparseConfig(
            task_type="CAUSAL_LM",
            target_modules="all-linear",
            num_tunable_weights=budget,
            selection=selection,
            budget=scope or "global",
            seed=seed,
            salience_batches=4,
        )
        model = get_peft_model(base, config)
        if selection != "random":
            with score_variant(mask if mask in VARIANTS else None):
                peft_sparse.select_mask(model, list(self.batches(self.train, 8))[:4])
        return model


class score_variant:
    """Within the block, the gradient metric scores by a variant (and its probes keep each column's input sum of
    squares, which ``column_rms`` needs). ``row_balanced`` needs the layers' ``density``: it divides ``|G|`` by each
    row's ``round(density * in)``-th largest entry, so that a layer's top-k takes that many entries from every row
    (the gradient's strongest of each row), then the next-best ratios. ``adam_gain`` scores ``G**2 / sqrt(sum_b
    g_b**2)`` (its probes keep Fisher's sum of squared batch gradients): the first-order loss decrease of an Adam
    step on the entry, which moves it by ``lr * mean(g) / rms(g)``, so an entry whose gradient changes sign from
    batch to batch counts for less than ``|G|`` says. ``mixed`` (needs ``density``) takes
    ``MIXED_GRADIENT_SHARE`` of each layer's entries by ``|G|`` and the rest at random, and keeps the gradient-chosen
    positions in ``score_variant.gradient_chosen`` (so that they can train at another rate)."""

    def __init__(self, variant: str | None, density: float | None = None) -> None:
        if variant in ("row_balanced", "mixed") and density is None:
            raise ValueError(f"score_variant({variant!r}) needs the layers' density")
        self.variant, self.density = variant, density

    gradient_chosen: list[torch.Tensor] = []  # noqa: RUF012 (``mixed``: each layer's gradient-chosen positions)

    def __enter__(self):
        from peft_sparse.selection import salience

        score_variant.gradient_chosen = []

        self.salience, self.metric, self.accumulate = salience, salience.METRICS["gradient"], None
        if self.variant is None:
            return self
        probes = {}
        accumulate = salience.GradientProbe.accumulate

        def keep_inputs(probe, grad_output_2d, input_2d):
            accumulate(probe, grad_output_2d, input_2d)
            if not hasattr(probe, "input_square"):
                probe.input_square, probe.rows = torch.zeros(input_2d.shape[-1], dtype=torch.float64), 0
            probe.input_square += input_2d.double().square().sum(0)
            probe.rows += input_2d.shape[0]
            probes[id(probe.grad)] = probe

        def score(grad, grad_square=None, **_):
            if self.variant == "adam_gain":
                return grad.square_().div_(grad_square.sqrt_().add_(torch.finfo(grad.dtype).tiny))
            magnitude = grad.abs_()
            if self.variant == "column_rms":
                probe = probes[id(grad)]
                rms = (probe.input_square / probe.rows).sqrt().float()
                return magnitude.div_(rms + 1e-6 * rms.mean())
            if self.variant == "mixed":
                top = magnitude.flatten().topk(round(self.density * magnitude.numel() * MIXED_GRADIENT_SHARE)).indices
                mixed = torch.rand(magnitude.shape, dtype=magnitude.dtype, device=magnitude.device)
                mixed.view(-1)[top] = 2.0  # above every random score: the layer's top-k keeps them all
                score_variant.gradient_chosen.append(top.sort().values)
                return mixed
            if self.variant == "row_balanced":
                per_row = min(magnitude.shape[1], max(1, round(self.density * magnitude.shape[1])))
                threshold = magnitude.topk(per_row, dim=1).values[:, -1:]
                return magnitude.div_(threshold.clamp_min_(torch.finfo(magnitude.dtype).tiny))
            rows = magnitude.square().mean(1, keepdim=True).sqrt()
            cols = magnitude.square().mean(0, keepdim=True).sqrt()
            return magnitude.div_((rows * cols).sqrt_().add_(1e-12))

        self.accumulate = accumulate
        salience.GradientProbe.accumulate = keep_inputs
        salience.METRICS["gradient"] = dataclasses.replace(
            self.metric, score=score, needs_grad_square=self.variant == "adam_gain"
        )
        return self

    def __exit__(self, *exc):
        self.salience.METRICS["gradient"] = self.metric
        if self.accumulate is not None:
            self.salience.GradientProbe.accumulate = self.accumulate


def probe_run(probe: Probe, mask: str, lr: float, epochs: int = 6, seed: int = 0) -> dict:
    model = probe.model(mask, seed)
    rng = random.Random(seed)
    order = []
    for _ in range(epochs):
        texts = list(probe.train)
        rng.shuffle(texts)
        order += list(probe.batches(texts, 8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / len(order))
    start = time.perf_counter()
    for batch in order:
        model(**batch).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return {
        "mask": mask,
        "lr": lr,
        "steps": len(order),
        "fit": probe.loss(model, probe.train),
        "english": probe.loss(model, probe.english),
        "seconds": time.perf_counter() - start,
    }


def mask_stats(probe: Probe, mask: str) -> dict:
    from peft_sparse.tuner.lookup import sparse_layers

    model = probe.model(mask)
    batches = list(probe.batches(probe.train, 8))[:4]
    square = {}
    hooks = []
    for name, layer in sparse_layers(model):

        def hook(module, inputs, output, name=name):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            square[name] = square.get(name, 0) + x.square().mean(0) / len(batches)

        hooks.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for hook in hooks:
        hook.remove()
    column_ratio, top_share, row_ratio, densities = [], [], [], []
    for name, layer in sparse_layers(model):
        positions = layer.sparse_indices["default"].long()
        rows, cols = layer.sparse_shape["default"].tolist()
        k = positions.numel()
        densities.append(k / (rows * cols))
        if k == 0:
            continue
        rms = square[name].sqrt()
        column, row = positions % cols, positions // cols
        column_ratio.append((k, (rms[column].mean() / rms.mean()).item()))
        per_column = torch.bincount(column, minlength=cols).float().sort(descending=True).values
        top_share.append((k, (per_column[: max(1, cols // 100)].sum() / k).item()))
        per_row = torch.bincount(row, minlength=rows).float()
        row_ratio.append((k, (per_row.max() / per_row.mean()).item()))

    def weighted(pairs):
        return sum(k * v for k, v in pairs) / sum(k for k, _ in pairs)

    return {
        "mask": mask,
        "column_rms_ratio": weighted(column_ratio),
        "share_in_top_1pct_columns": weighted(top_share),
        "busiest_row_over_mean": weighted(row_ratio),
        "layer_density_min": min(densities),
        "layer_density_max": max(densities),
    }


def _sqrt_row_col(grad, **_):
    magnitude = grad.abs_()
    rows = magnitude.square().mean(1, keepdim=True).sqrt()
    cols = magnitude.square().mean(0, keepdim=True).sqrt()
    return magnitude.div_((rows * cols).sqrt_().add_(1e-12))


def _top(score, grad: torch.Tensor, square: torch.Tensor, k: int) -> torch.Tensor:
    """A layer's top-k flat positions by ``score`` (``"row_balanced"``: the same number of entries in every row)."""
    if score == "row_balanced":
        rows, cols = grad.shape
        per_row = grad.abs().topk(max(1, k // rows), dim=1).indices
        return (per_row + torch.arange(rows)[:, None] * cols).flatten()
    return score(grad.clone(), square).flatten().topk(k).indices


def transfer(task_name: str) -> dict:
    """How much of the held-out gradient each mask holds, and how stable it is between two sets of salience batches
    (see the module's docstring)."""
    import suite
    import transformers

    from peft_sparse.cli import models
    from peft_sparse.selection import salience

    train, evaluation = suite.TASKS[task_name].build()
    if "text" not in train.column_names or "validation" not in evaluation:
        raise SystemExit(f"transfer: {task_name} is not a text task with a validation split")
    source = models.as_folder(models.resolve("smollm2"))
    tokenizer = models.load_tokenizer(source)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, local_files_only=True)
    model.requires_grad_(False)
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }
    for module in layers.values():
        module.weight.requires_grad_(True)

    def summed_gradient(texts: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(sum over batches of the gradient, sum over batches of its square) per layer."""
        total = {name: torch.zeros_like(module.weight) for name, module in layers.items()}
        square = {name: torch.zeros_like(module.weight) for name, module in layers.items()}
        for start in range(0, len(texts), 8):
            encoded = tokenizer(
                texts[start : start + 8], return_tensors="pt", padding=True, truncation=True, max_length=64
            )
            labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
            model(**encoded, labels=labels).loss.backward()
            for name, module in layers.items():
                total[name] += module.weight.grad
                square[name].addcmul_(module.weight.grad, module.weight.grad)
                module.weight.grad = None
        return total, square

    texts = train["text"]
    (first, first_square), (second, second_square) = summed_gradient(texts[:32]), summed_gradient(texts[32:64])
    held_out = summed_gradient(evaluation["validation"]["text"])[0]
    budget = sum(8 * sum(module.weight.shape) for module in layers.values())
    density = budget / sum(module.weight.numel() for module in layers.values())
    scores = {
        "gradient": lambda grad, square: salience.METRICS["gradient"].score(grad=grad),
        "relative_gradient": lambda grad, square: salience.METRICS["relative_gradient"].score(grad=grad),
        "sqrt_row_col": lambda grad, square: _sqrt_row_col(grad=grad),
        # |sum g| / sqrt(sum g^2): how consistent the batches' gradients are (Adam's step direction is reliable)
        "consistency": lambda grad, square: grad.abs_().div_(square.sqrt().add_(1e-30)),
        # |sum g|^2 / sqrt(sum g^2): first-order loss decrease of one Adam-like step
        "adam_gain": lambda grad, square: grad.square_().div_(square.sqrt().add_(1e-30)),
        # the gradient's top entries of each row, the same number in every row (no row piles up)
        "row_balanced": "row_balanced",
    }
    result = {"task": task_name, "density": density}
    for score_name, score in scores.items():
        sums = dict.fromkeys(
            ("overlap", "train_square", "held_out_square", "held_out_abs", "busiest_row", "top_columns"), 0.0
        )
        for name, module in layers.items():
            rows, cols = module.weight.shape
            k = round(density * module.weight.numel())

            mask = _top(score, first[name], first_square[name], k)
            other = _top(score, second[name], second_square[name], k)
            train_grad, held_grad = first[name].flatten(), held_out[name].flatten()
            # entry-weighted means over layers of each layer's share
            sums["overlap"] += torch.isin(mask, other).sum().item()
            sums["train_square"] += k * (train_grad[mask].square().sum() / train_grad.square().sum()).item()
            sums["held_out_square"] += k * (held_grad[mask].square().sum() / held_grad.square().sum()).item()
            sums["held_out_abs"] += k * (held_grad[mask].abs().sum() / held_grad.abs().sum()).item()
            per_row = torch.bincount(mask // cols, minlength=rows).float()
            per_column = torch.bincount(mask % cols, minlength=cols).float().sort(descending=True).values
            sums["busiest_row"] += k * (per_row.max() / per_row.mean()).item()
            sums["top_columns"] += (per_column[: max(1, cols // 100)].sum()).item()
        result[score_name] = {key: round(value / budget, 4) for key, value in sums.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("stats", "probe", "transfer"))
    parser.add_argument(
        "runs", nargs="*", help="probe: MASK:LR ...; stats: masks (default: gradient, relative, random)"
    )
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    if args.what == "transfer":
        for task in args.runs or ["quotes_de"]:
            print(json.dumps(transfer(task)), flush=True)
        return
    probe = Probe()
    if args.what == "stats":
        for mask in args.runs or ["gradient", "relative_gradient", "random"]:
            print(json.dumps(mask_stats(probe, mask)), flush=True)
        return
    for spec in args.runs:
        mask, _, lr = spec.partition(":")
        if not lr:
            sys.exit(f"probe: expected MASK:LR, got {spec!r}")
        print(json.dumps(probe_run(probe, mask, float(lr))), flush=True)


if __name__ == "__main__":
    main()
