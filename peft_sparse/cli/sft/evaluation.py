"""Exact match of greedy generations on held-out rows with an ``answer`` column (the built-in data's one-word
answers), the held-out score next to the loss. Importable alone: ``benchmarks/`` score their runs with it."""

from __future__ import annotations

# Exact match: greedy generations of at most this many tokens, on at most this many held-out rows (those of task
# EXACT_MATCH_TASK where the data has a ``task`` column: one-word answers).
EXACT_MATCH_ROWS = 100
EXACT_MATCH_TASK = "base_form"
EXACT_MATCH_NEW_TOKENS = 8
GENERATION_BATCH = 16


def exact_match(
    model,
    tokenizer,
    rows,
    max_rows: int = EXACT_MATCH_ROWS,
    task: str = EXACT_MATCH_TASK,
    max_new_tokens: int = EXACT_MATCH_NEW_TOKENS,
    batch_size: int = GENERATION_BATCH,
) -> tuple[float, int] | None:
    """Share of ``rows`` whose greedy generation, stripped, equals their ``answer``, and how many rows were scored.

    Rows are those of ``task`` when there is a ``task`` column, at most ``max_rows``; the prompt is the
    ``prompt`` column (a string, or chat messages rendered with the tokenizer's chat template and a generation
    prompt) or the ``messages`` before the last assistant turn. ``None`` where the data has no ``answer`` column or
    no prompt to generate from."""
    import torch

    if "answer" not in rows.column_names or not ({"prompt", "messages"} & set(rows.column_names)):
        return None
    if "task" in rows.column_names:
        rows = rows.filter(lambda row: row["task"] == task)
    rows = rows.select(range(min(max_rows, len(rows))))
    if len(rows) == 0:
        return None
    prompts = [_prompt_ids(row, tokenizer) for row in rows]
    answers = [str(answer).strip() for answer in rows["answer"]]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer.pad(
                [{"input_ids": ids} for ids in prompts[start : start + batch_size]], return_tensors="pt"
            ).to(device)
            with torch.no_grad():
                generated = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(text.strip() == answer for text, answer in zip(texts, answers[start : start + batch_size]))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return correct / len(prompts), len(prompts)


def _prompt_ids(row: dict, tokenizer) -> list[int]:
    """The prompt's token ids as TRL's SFTTrainer tokenises it for training: chat messages through the chat template
    with a generation prompt, plain text through the tokenizer (special tokens included)."""
    prompt = row.get("prompt")
    if prompt is None:
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        prompt = messages[:last]
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
