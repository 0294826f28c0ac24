"""Reading local text corpora (.txt, .jsonl, .json) for calibration and perplexity."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .bundled import BUNDLED_TEXT
from .errors import SketchError

#: Short names for the text slices bundled with the package (so nothing outside the repo is needed).
BUNDLED = {
    "c4": BUNDLED_TEXT / "c4_sample_300.jsonl",
    "wikitext2": BUNDLED_TEXT / "wiki.test.raw",
    "tinystories": BUNDLED_TEXT / "tinystories_sample.txt",
}
DOC_SEPARATOR = "<|endoftext|>"


def resolve_text_path(spec: str | os.PathLike) -> Path:
    """A bundled short name (``c4``, ``wikitext2``, ``tinystories``) or an existing file."""
    if str(spec) in BUNDLED:
        return BUNDLED[str(spec)]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SketchError(f"no such text file: {spec} (or use one of the bundled names {sorted(BUNDLED)})")
    return path


def read_documents(spec: str | os.PathLike) -> list[str]:
    """Documents of a corpus: JSON lines / a JSON list (field ``text``, else the first string field), or
    plain text (CRLF normalised, ``<|endoftext|>``-separated stories split into documents)."""
    path = resolve_text_path(spec)
    raw = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    if path.suffix in (".jsonl", ".json"):
        try:
            if path.suffix == ".jsonl":
                records = [json.loads(line) for line in raw.splitlines() if line.strip()]
            else:
                records = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SketchError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
        docs = [_record_text(r) for r in (records if isinstance(records, list) else [records])]
    else:
        docs = [d.strip("\n") for d in raw.split(DOC_SEPARATOR)] if DOC_SEPARATOR in raw else [raw]
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise SketchError(f"{path} contains no text")
    return docs


def read_text(spec: str | os.PathLike) -> str:
    """A whole corpus as one string, documents joined by a blank line (the perplexity protocol)."""
    return "\n\n".join(read_documents(spec))


def _record_text(record) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        for value in record.values():
            if isinstance(value, str):
                return value
    return ""
