"""Training data: LLM-Adapters instruction records, GSM8K records, or plain text, tokenized for causal LM.

Instruction data is rendered with the Alpaca template the SketchTune/LLM-Adapters authors use and the loss is
taken on the response tokens only (prompt labels are -100). Records longer than ``cutoff_len`` are truncated;
no packing, so every example is one sequence. Plain ``.txt`` files become consecutive ``cutoff_len``-token
chunks with the loss on every token (language-model fine-tuning).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_dataset

from ..errors import SketchError
from ..prompts import format_prompt
from ..text import read_text, resolve_text_path

IGNORE_INDEX = -100
GSM8K_FINAL = re.compile(r"\n?####\s*(.+)\s*$")


def _normalize(record: dict) -> dict:
    """One record in any supported schema → {instruction, input, output}."""
    if record.get("instruction") is not None and record.get("output") is not None:
        return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}
    if record.get("question") is not None and record.get("answer") is not None:  # GSM8K: rationale then "#### N"
        answer = GSM8K_FINAL.sub(lambda m: f"\nThe answer is {m.group(1).strip()}", str(record["answer"]))
        answer = re.sub(r"<<[^>]*>>", "", answer)  # drop calculator annotations
        return {"instruction": record["question"], "input": "", "output": answer}
    present = sorted(k for k, v in record.items() if v is not None)
    raise SketchError(f"unrecognised record fields {present}: need instruction/output or question/answer")


def load_instruction_data(paths: str | list[str]) -> Dataset:
    """Concatenate JSON/JSONL instruction files (comma-separated string or list) into one Dataset."""
    paths = [p for p in (paths.split(",") if isinstance(paths, str) else paths) if p]
    parts = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise SketchError(f"no such training data file: {p}")
        try:
            ds = load_dataset("json", data_files=str(path), split="train")
        except Exception as e:
            raise SketchError(f"cannot read {p} as JSON records: {str(e).splitlines()[0]}") from None
        parts.append(ds.map(_normalize, remove_columns=ds.column_names, desc=f"reading {path.name}"))
    if not parts:
        raise SketchError("no training data given")
    return concatenate_datasets(parts)


def tokenize_instructions(ds: Dataset, tokenizer, cutoff_len: int = 256, train_on_inputs: bool = False) -> Dataset:
    """input_ids / attention_mask / labels with prompt tokens masked out of the loss."""
    eos = tokenizer.eos_token or ""

    def encode(rec: dict) -> dict:
        prompt = format_prompt(rec["instruction"], rec["input"])
        p_ids = tokenizer(prompt, add_special_tokens=True).input_ids
        full = tokenizer(prompt + rec["output"] + eos, add_special_tokens=True).input_ids[:cutoff_len]
        labels = list(full)
        if not train_on_inputs:
            n = min(len(p_ids), len(full))
            labels[:n] = [IGNORE_INDEX] * n
        return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}

    out = ds.map(encode, remove_columns=ds.column_names, desc="tokenizing")
    return out.filter(lambda r: any(l != IGNORE_INDEX for l in r["labels"]), desc="dropping prompt-only rows")


def tokenize_text(source: str | os.PathLike, tokenizer, cutoff_len: int = 256) -> Dataset:
    """Plain text → consecutive ``cutoff_len`` chunks, loss on every token."""
    ids = tokenizer(read_text(resolve_text_path(source)), add_special_tokens=False).input_ids
    chunks = [ids[i : i + cutoff_len] for i in range(0, len(ids) - cutoff_len + 1, cutoff_len)]
    if not chunks:
        raise SketchError(f"{source}: fewer than cutoff_len={cutoff_len} tokens")
    return Dataset.from_dict({"input_ids": chunks, "attention_mask": [[1] * cutoff_len] * len(chunks),
                              "labels": chunks})


def build_dataset(paths: str, tokenizer, cutoff_len: int = 256, train_on_inputs: bool = False) -> Dataset:
    """Tokenized dataset from instruction JSON/JSONL files or, for ``.txt`` / bundled text names, plain text."""
    first = paths.split(",")[0]
    if first.endswith((".json", ".jsonl")):
        return tokenize_instructions(load_instruction_data(paths), tokenizer, cutoff_len, train_on_inputs)
    return concatenate_datasets([tokenize_text(p, tokenizer, cutoff_len) for p in paths.split(",") if p])
