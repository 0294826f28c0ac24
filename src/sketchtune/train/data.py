"""Training data: LLM-Adapters instruction records, GSM8K records, or plain text, tokenized for causal LM.

Instruction data is rendered with the Alpaca template the SketchTune/LLM-Adapters authors use and the loss is
taken on the response tokens only (prompt labels are -100). Records longer than ``cutoff_len`` are truncated;
no packing, so every example is one sequence. Plain ``.txt`` files become consecutive ``cutoff_len``-token
chunks with the loss on every token (language-model fine-tuning).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from datasets import Dataset, concatenate_datasets

from ..errors import SketchError
from ..prompts import format_prompt
from ..text import BUNDLED, read_text, resolve_text_path

IGNORE_INDEX = -100
GSM8K_FINAL = re.compile(r"\n?####\s*(.+)\s*$")


def _normalize(record: dict) -> dict:
    """One record in any supported schema → {instruction, input, output}."""
    if record.get("instruction") is not None and record.get("output") is not None:
        return {"instruction": str(record["instruction"]), "input": str(record.get("input") or ""),
                "output": str(record["output"])}
    if record.get("question") is not None and record.get("answer") is not None:  # GSM8K: rationale then "#### N"
        answer = GSM8K_FINAL.sub(lambda m: f"\nThe answer is {m.group(1).strip()}", str(record["answer"]))
        answer = re.sub(r"<<[^>]*>>", "", answer)  # drop calculator annotations
        return {"instruction": str(record["question"]), "input": "", "output": answer}
    present = sorted(k for k, v in record.items() if v is not None)
    raise SketchError(f"unrecognised record fields {present}: need instruction/output or question/answer")


TEXT_SUFFIXES = (".txt", ".raw")
RECORD_SUFFIXES = (".json", ".jsonl")


def read_records(path: Path) -> list[dict]:
    """JSON records of one file (a JSON list, or one object per line), with the line of any syntax error."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix == ".jsonl":
            records = []
            for lineno, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SketchError(f"{path}: invalid JSON on line {lineno} ({e.msg})") from None
        else:
            records = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SketchError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise SketchError(f"{path}: expected a list of JSON objects (records)")
    if not records:
        raise SketchError(f"{path} holds no records")
    return records


def load_instruction_data(paths: str | list[str]) -> Dataset:
    """Concatenate JSON/JSONL instruction files (comma-separated string or list) into one Dataset."""
    paths = [p for p in (paths.split(",") if isinstance(paths, str) else paths) if p]
    if not paths:
        raise SketchError("no training data given")
    rows: list[dict] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise SketchError(f"no such training data file: {p}")
        for i, record in enumerate(read_records(path)):
            try:
                rows.append(_normalize(record))
            except SketchError as e:
                raise SketchError(f"{path}, record {i + 1}: {e}") from None
    return Dataset.from_list(rows)


def encode_example(tokenizer, prompt: str, response: str, cutoff_len: int, train_on_inputs: bool = False) -> dict:
    """input_ids / attention_mask / labels for one (prompt, response) pair.

    Prompt and response are tokenized *separately* and their ids concatenated. Tokenizing ``prompt + response``
    as one string lets a tokenizer merge the prompt's last characters with the response's first (TinyStories'
    merges ``":\n"`` with the next word): the first answer token is then masked as prompt, and at inference,
    where the prompt is tokenized alone, the model sees a prompt ending it was never trained on. This way every
    response token is supervised and training ends the prompt exactly as :func:`format_prompt` does at
    inference.
    """
    p_ids = tokenizer(prompt, add_special_tokens=True).input_ids
    r_ids = tokenizer(response, add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        r_ids = r_ids + [tokenizer.eos_token_id]
    full = (p_ids + r_ids)[:cutoff_len]
    labels = list(full) if train_on_inputs else ([IGNORE_INDEX] * len(p_ids) + r_ids)[:cutoff_len]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


def tokenize_instructions(ds: Dataset, tokenizer, cutoff_len: int = 256, train_on_inputs: bool = False) -> Dataset:
    """input_ids / attention_mask / labels with prompt tokens masked out of the loss (see :func:`encode_example`)."""

    def encode(rec: dict) -> dict:
        return encode_example(tokenizer, format_prompt(rec["instruction"], rec["input"]), rec["output"],
                              cutoff_len, train_on_inputs)

    out = ds.map(encode, remove_columns=ds.column_names, desc="tokenizing")
    out = out.filter(lambda r: any(l != IGNORE_INDEX for l in r["labels"]), desc="dropping prompt-only rows")
    if len(out) == 0:
        raise SketchError(f"every example's prompt is longer than cutoff_len={cutoff_len}: nothing to train on")
    return out


def tokenize_text(source: str | os.PathLike, tokenizer, cutoff_len: int = 256) -> Dataset:
    """Plain text → consecutive ``cutoff_len`` chunks, loss on every token."""
    ids = tokenizer(read_text(resolve_text_path(source)), add_special_tokens=False).input_ids
    chunks = [ids[i : i + cutoff_len] for i in range(0, len(ids) - cutoff_len + 1, cutoff_len)]
    if not chunks:
        raise SketchError(f"{source}: {len(ids)} tokens of text, fewer than cutoff_len={cutoff_len}")
    return Dataset.from_dict({"input_ids": chunks, "attention_mask": [[1] * cutoff_len] * len(chunks),
                              "labels": chunks})


def build_dataset(paths: str, tokenizer, cutoff_len: int = 256, train_on_inputs: bool = False) -> Dataset:
    """Tokenized dataset from instruction JSON/JSONL files or, for ``.txt`` / bundled text names, plain text."""
    parts = [p for p in paths.split(",") if p]
    if not parts:
        raise SketchError("no training data given")
    kinds = set()
    for p in parts:
        suffix = Path(p).suffix.lower()
        if suffix in RECORD_SUFFIXES:
            kinds.add("records")
        elif suffix in TEXT_SUFFIXES or p in BUNDLED:
            kinds.add("text")
        else:
            raise SketchError(f"unsupported training data {p}: use .json/.jsonl instruction records, .txt text, "
                              f"or a bundled name ({', '.join(sorted(BUNDLED))})")
    if len(kinds) > 1:
        raise SketchError("--data mixes instruction records (.json/.jsonl) and plain text; train on one kind")
    if kinds == {"records"}:
        return tokenize_instructions(load_instruction_data(parts), tokenizer, cutoff_len, train_on_inputs)
    return concatenate_datasets([tokenize_text(p, tokenizer, cutoff_len) for p in parts])
