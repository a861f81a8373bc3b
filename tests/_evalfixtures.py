"""Tiny, deterministic fixtures for lm-eval tests: a Gemma-3 text model and MC task YAMLs.

Everything is built from the real classes (``Gemma3ForCausalLM``, a ``tokenizers``
WordLevel tokenizer wrapped in ``PreTrainedTokenizerFast``) so lm-eval loads it exactly
as it loads a real checkpoint folder, but the model has ~60k parameters and scores a
handful of documents in well under a second on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, matching the model config
ITEMS = ["apple", "sky", "grass", "snow", "coal", "sun", "cherry", "sea", "leaf", "milk"]
COLOURS = ["red", "blue", "green", "white", "black", "yellow"]
ANSWERS = {
    "apple": "red",
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "sun": "yellow",
    "cherry": "red",
    "sea": "blue",
    "leaf": "green",
    "milk": "white",
}
WORDS = ["question", "colour", "of", "answer", ":", "?", ".", *ITEMS, *COLOURS]
VOCAB = {w: i for i, w in enumerate([*SPECIALS, *WORDS])}


def build_tokenizer(folder: Path) -> Path:
    """Save a WordLevel tokenizer over :data:`VOCAB` (whitespace-split, BOS-prefixed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", VOCAB["<bos>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(folder)
    return folder


def build_tiny_gemma(folder: Path, *, seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer ``Gemma3ForCausalLM`` (fp32) plus tokenizer."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    model = Gemma3ForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    build_tokenizer(folder)
    return folder


def write_mc_task(
    folder: Path, name: str, *, n_test: int = 6, n_train: int = 4, num_fewshot: int | None = None
) -> Path:
    """Write a multiple-choice "colour of X" task ``name`` (YAML + JSONL) into ``folder``.

    Test documents use the first ``n_test`` items, few-shot documents the next
    ``n_train`` (wrapping around). ``data_files`` are absolute, since lm-eval resolves
    relative ones against the working directory. Returns the YAML path.
    """
    folder.mkdir(parents=True, exist_ok=True)

    def doc(item: str) -> dict:
        choices = COLOURS[:4] if ANSWERS[item] in COLOURS[:4] else COLOURS[2:]
        return {"item": item, "choices": choices, "label": choices.index(ANSWERS[item])}

    splits = {
        "test": [doc(ITEMS[i % len(ITEMS)]) for i in range(n_test)],
        "train": [doc(ITEMS[(n_test + i) % len(ITEMS)]) for i in range(n_train)],
    }
    files = {}
    for split, docs in splits.items():
        path = (folder / f"{name}_{split}.jsonl").resolve()
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        files[split] = str(path)
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {files['test']}",
        f"    train: {files['train']}",
        "output_type: multiple_choice",
        "test_split: test",
        "training_split: train",
        "fewshot_split: train",
        'doc_to_text: "question : colour of {{item}} ? answer :"',
        "doc_to_choice: choices",
        "doc_to_target: label",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
    ]
    if num_fewshot is not None:
        lines.append(f"num_fewshot: {num_fewshot}")
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text("\n".join(lines) + "\n")
    return yaml_path


def write_gen_task(folder: Path, name: str, *, n_test: int = 6) -> Path:
    """Write a ``generate_until`` "colour of X" task ``name`` scored by ``exact_match``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / f"{name}_test.jsonl").resolve()
    docs = [
        {"item": ITEMS[i % len(ITEMS)], "answer": ANSWERS[ITEMS[i % len(ITEMS)]]}
        for i in range(n_test)
    ]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {path}",
        "output_type: generate_until",
        "test_split: test",
        'doc_to_text: "question : colour of {{item}} ? answer :"',
        'doc_to_target: "{{answer}}"',
        "generation_kwargs:",
        '  until: ["."]',
        "  max_gen_toks: 2",
        "  do_sample: false",
        "metric_list:",
        "  - metric: exact_match",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
    ]
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text("\n".join(lines) + "\n")
    return yaml_path
