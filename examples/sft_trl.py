"""Sparse fine-tuning with TRL's SFTTrainer and SparseTrainingCallback, offline, on CPU, in a minute or two.

    python examples/sft_trl.py                         # a small Llama initialised here, on real quotations
    python examples/sft_trl.py --model /path/to/a/causal-lm --steps 200

The recipe is the part to copy (`main`, about fifteen lines): a peft model with a `SparseConfig` (SpIEL
prune-and-regrow on top of a gradient-salience mask), `SFTTrainer` with `SparseTrainingCallback()`, save, reload.

Defaults are chosen so that it runs anywhere without downloads: the text is the Debian `fortunes` quotations
(`apt-get install fortunes`; BSD licence, see /usr/share/doc/fortunes/copyright); unless `--model` names a local
causal LM (whose tokenizer is then used), the tokenizer is a word-level vocabulary of the quotations' 2,000 most
frequent words built here and the model a 2-layer Llama *initialised here at random*: it shows the mechanics (a
sparse adapter learning with everything else frozen), not a pretrained model's quality.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from peft_sparse.cli.data import CATEGORIES, read_fortunes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a local causal LM directory (default: a small random Llama)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--density", type=float, default=0.05, help="fraction of each targeted weight trained")
    parser.add_argument("--output-dir", default=None, help="where the adapter goes (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not 0.0 < args.density <= 1.0:
        parser.error(f"--density must be in (0, 1], got {args.density}")
    return args


def word_tokenizer(texts, size: int = 2000):
    """A word-level tokenizer over the ``size`` most frequent words of ``texts`` (lower-cased; others -> [UNK])."""
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    counts = Counter(word for text in texts for word in text.lower().split())
    vocab = {token: i for i, token in enumerate(specials + [word for word, _ in counts.most_common(size)])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def base_model(path, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def main(argv=None) -> None:
    args = parse_args(argv)
    from datasets import Dataset
    from peft import PeftModel, get_peft_model
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from peft_sparse import SparseConfig, SparseTrainingCallback

    texts = [quote for category in CATEGORIES for quote in read_fortunes(category)]
    tokenizer = AutoTokenizer.from_pretrained(args.model) if args.model else word_tokenizer(texts)
    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="sft_trl_"))

    # --- the recipe -------------------------------------------------------------------------------------------
    model = get_peft_model(
        base_model(args.model, tokenizer),
        SparseConfig(
            target_modules="all-linear",
            density=args.density,
            selection="gradient",
            salience_batches=8,  # mask chosen at train begin by salience
            update="spiel",
            update_interval=20,
            accumulation_steps=5,
        ),
    )  # then SpIEL prune-and-regrow
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"text": texts}),
        args=SFTConfig(
            output_dir=str(output_dir),
            max_steps=args.steps,
            per_device_train_batch_size=16,
            learning_rate=5e-2,
            max_length=48,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            lr_scheduler_type="constant",
        ),
        callbacks=[SparseTrainingCallback()],
    )
    trainer.train()
    model.save_pretrained(output_dir / "adapter")
    # ----------------------------------------------------------------------------------------------------------

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    sparse = [entry for entry in trainer.state.log_history if any(key.startswith("sparse/") for key in entry)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    reloaded = PeftModel.from_pretrained(base_model(args.model, tokenizer), output_dir / "adapter")
    trained, loaded = (
        {name: tensor for name, tensor in m.state_dict().items() if "sparse_" in name} for m in (model, reloaded)
    )
    same = trained.keys() == loaded.keys() and all(torch.equal(trained[k].float(), loaded[k].float()) for k in trained)
    print(f"quotations          : {len(texts)} from {', '.join(CATEGORIES)}")
    print(f"trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")
    print(f"train loss          : {losses[0]:.3f} -> {losses[-1]:.3f} (logged every 10 steps)")
    print(
        "sparse events       : "
        + ", ".join(
            f"step {e['step']}: "
            + ", ".join(f"{k.split('/')[1]}={v:.3g}" for k, v in e.items() if k.startswith("sparse/"))
            for e in sparse
        )
    )
    print(f"adapter             : {output_dir / 'adapter'} (reloaded indices and values identical: {same})")
    if not same:
        sys.exit("the reloaded adapter differs from the trained one")


if __name__ == "__main__":
    main()
