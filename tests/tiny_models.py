"""Tiny models built from configs (no downloads) shared by the tests.

Dropout is off so that a model in train mode is deterministic and can be compared with a dense reference.
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

VOCAB = 97


def llama_of_width(
    hidden: int, intermediate: int, seed: int = 0, dtype: torch.dtype = torch.float32, **config
) -> LlamaForCausalLM:
    """A 2-layer Llama with the given hidden and MLP widths (4 heads, 2 key/value heads), seeded, in eval mode;
    ``config``: other ``LlamaConfig`` fields (a vocabulary size, special token ids)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        **{
            "vocab_size": VOCAB,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            **config,
        }
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    return llama_of_width(32, 48, seed, dtype)


def tiny_llama_aligned(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A ``tiny_llama`` whose linear layers all have ``in_features`` a multiple of 64 (64 and 128), bitsandbytes'
    default 4-bit block, as real models have (``tiny_llama``'s 32 and 48 are not: see ``bnb_defects``)."""
    return llama_of_width(64, 128, seed, dtype)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return OPTForCausalLM(config).eval()


# name -> (factory, target_modules); the targets name the attention projections of each family.
MODEL_FAMILIES = {
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"]),
    "bert": (tiny_bert, ["query", "value"]),
    "opt": (tiny_opt, ["q_proj", "v_proj"]),
}


def count_block_forwards(model) -> list[int]:
    """A counter per decoder block of a (peft-wrapped) Llama, bumped at every forward of the block's MLP: how often
    selection ran each block (checkpoint replays included)."""
    blocks = model.get_base_model().model.layers
    calls = [0] * len(blocks)
    for index, block in enumerate(blocks):
        block.mlp.register_forward_pre_hook(lambda module, args, i=index: calls.__setitem__(i, calls[i] + 1))
    return calls


def make_batch(seed: int = 0, batch: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def quantised_tiny_llama(directory, **bnb_kwargs):
    """``tiny_llama()`` saved to ``directory`` (once) and loaded back through bitsandbytes with ``bnb_kwargs`` (e.g.
    ``load_in_4bit=True, bnb_4bit_quant_type="nf4"``), on the CPU, in fp32 apart from the quantised weights."""
    return quantised_model(directory, tiny_llama, **bnb_kwargs)


def quantised_model(directory, factory, **bnb_kwargs):
    """``factory()`` (``tiny_llama``, ``tiny_llama_aligned``) saved to ``directory`` (once; one directory per
    factory) and loaded back through bitsandbytes with ``bnb_kwargs``, on the CPU, in fp32 apart from the quantised
    weights."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not (Path(directory) / "config.json").exists():
        factory().save_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=BitsAndBytesConfig(**bnb_kwargs), device_map="cpu", dtype=torch.float32
    )
    return model.eval()


def dequantised_copy(quantised_model) -> LlamaForCausalLM:
    """A plain fp32 ``tiny_llama`` whose weights are the quantised model's weights, dequantised by bitsandbytes: the
    dense model that computes what the quantised one computes, where bitsandbytes' ``dequantize_4bit`` is sound. On
    some CPUs it is not for ``tiny_llama``'s shapes (``bnb_defects``); ``reference_dequantised_copy`` decodes with
    peft-sparse's own reference instead."""
    return _dense_copy(quantised_model, tiny_llama(), decoder="bitsandbytes")


def reference_dequantised_copy(quantised_model, factory=tiny_llama, dtype: torch.dtype = torch.float64):
    """``factory(dtype=dtype)`` holding the quantised model's parameters, its 4-bit weights decoded by peft-sparse's
    pure-PyTorch reference (``decode_4bit``) instead of by bitsandbytes; the judge of what a 4-bit model computes,
    on any CPU. The decode is exact in fp32, so ``dtype=torch.float32`` gives the same weights bit for bit."""
    return _dense_copy(quantised_model, factory(dtype=dtype), decoder="reference")


def decode_4bit(packed: torch.Tensor, quant_state, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (packed bytes and ``QuantState``) decoded by peft-sparse's pure-PyTorch reference
    (``peft_sparse.ops.reference.dequant_scatter``), independent of bitsandbytes' own ``dequantize_4bit``. The decode
    is computed in fp32, as bitsandbytes computes it, so float64 (the default) and float32 hold it exactly."""
    from peft_sparse.ops import reference

    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "decode_4bit: the weight was repacked by bitsandbytes' CPU inference forward (bf16 absmax); "
            "decode it before running bitsandbytes' forward on it"
        )
    nested = bool(getattr(quant_state, "nested", False))
    state2 = quant_state.state2 if nested else None
    empty = torch.zeros(0, dtype=torch.int64)
    return reference.dequant_scatter(
        packed,
        quant_state.absmax,
        quant_state.code,
        int(quant_state.blocksize),
        tuple(quant_state.shape),
        dtype,
        empty,
        empty.to(dtype),
        nested_absmax=state2.absmax if nested else None,
        nested_code=state2.code if nested else None,
        nested_blocksize=int(state2.blocksize) if nested else 256,
        offset=float(quant_state.offset) if nested else 0.0,
    )


def _dense_copy(quantised_model, dense, decoder: str):
    """``dense`` with the quantised model's parameters: 4-bit weights decoded by ``decoder`` ("reference" or
    "bitsandbytes"), int8 weights by bitsandbytes' row-wise formula (the one peft-sparse's 8-bit layer uses), and
    every other parameter copied."""
    import bitsandbytes as bnb

    modules = dict(quantised_model.named_modules())
    with torch.no_grad():
        for name, module in dense.named_modules():
            source = modules.get(name)
            if hasattr(source, "get_base_layer"):  # a peft adapter layer wrapping the quantised layer
                source = source.get_base_layer()
            if isinstance(source, bnb.nn.Linear4bit):
                weight = source.weight
                if decoder == "reference":
                    decoded = decode_4bit(weight.data, weight.quant_state, dtype=torch.float64)
                else:
                    decoded = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
                module.weight.copy_(decoded)
                if source.bias is not None:
                    module.bias.copy_(source.bias)
            elif isinstance(source, bnb.nn.Linear8bitLt):
                scales = source.weight.SCB if source.weight.SCB is not None else source.state.SCB
                module.weight.copy_(bnb.functional.int8_vectorwise_dequant(source.weight.data, scales))
                if source.bias is not None:
                    module.bias.copy_(source.bias)
            elif source is not None:
                own = dict(source.named_parameters(recurse=False))
                for key, parameter in module.named_parameters(recurse=False):
                    parameter.copy_(own[key])
    return dense.eval()


def tiny_tokenizer():
    """A word-level tokenizer built locally (no downloads) whose ids fit ``VOCAB``: special tokens, lowercase
    letters and a few words; anything else maps to ``<unk>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    vocab = {token: i for i, token in enumerate(specials + words + [chr(c) for c in range(ord("a"), ord("z") + 1)])}
    assert len(vocab) <= VOCAB
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


# ---------------------------------------------------------------------------------------------------- 4-bit


def four_bit(quant_type="nf4", double_quant=True, compute_dtype=torch.float32):
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
    }


def block_absmax(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = weight.reshape(-1)
    pad = (-flat.numel()) % blocksize
    flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize).abs().amax(dim=1).repeat_interleave(blocksize)[: weight.numel()].view_as(weight)


def decoded(layer):
    """The 4-bit base weight of a sparse layer, decoded by our reference in float64."""
    weight = layer.get_base_layer().weight
    return decode_4bit(weight.data, weight.quant_state)


def assert_within_one_quantisation_step(merged, target, quant_type, name):
    """``merged`` (the decode of the re-quantised weight) is ``target`` rounded to the nearest code of its block.

    Rounding to the nearest code is off by at most half the largest gap between neighbouring codes, relative to the
    block's absmax ``s``: NF4 0.304 (between -1 and -0.696), FP4 1/3. The decoded scale ``s'`` is ``s`` after the
    absmax's own 8-bit double quantisation, which moves every decoded element by at most ``|s' - s|`` (up to ~3 % of
    ``s`` on these models). The element at the absmax decodes to exactly ``±s'`` (both code books hold ±1), so
    ``s'`` is the absmax of ``merged``'s block.
    """
    half_gap = {"nf4": 0.3038 / 2, "fp4": 1 / 6}[quant_type]
    scale, decoded_scale = block_absmax(target, 64), block_absmax(merged, 64)
    bound = half_gap * scale + (decoded_scale - scale).abs() + 1e-6
    assert ((merged - target).abs() <= bound).all(), name


def save_tiny_bert_classifier(folder, words, num_labels: int, seed: int = 0):
    """A 2-layer BERT sequence classifier built from a config, with a word-piece vocabulary of ``words``, saved with
    its tokenizer to ``folder`` (for the command-line tests, which load models from folders)."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    config.num_labels = num_labels
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def save_tiny_chat_llama(folder, words, specials, chat_template: str, seed: int = 0):
    """``llama_of_width(64, 128)``'s shape (bitsandbytes' 4-bit block) with a word-level tokenizer over ``specials``
    (pad, unk, bos, eos first) and ``words``, and ``chat_template``, saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(specials) + sorted(set(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    model = llama_of_width(
        64,
        128,
        seed,
        vocab_size=len(vocab),
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<|im_start|>"],
        eos_token_id=vocab["<|im_end|>"],
    )
    model.save_pretrained(folder)
    return folder
