"""Answer extraction for the LLM-Adapters math and commonsense suites: pure functions on generated text.

The rules are those of LLM-Adapters' ``evaluate.py`` / ``commonsense_evaluate.py`` (which SketchTune's
evaluation scripts copy), so accuracies stay comparable with the published tables, warts included. Where we
deviate it is said at the function; in short:

* nothing extractable gives ``None`` (upstream: ``inf`` or ``""``) — the verdict, wrong, is the same;
* commonsense labels are matched case-insensitively, as SketchTune does (LLM-Adapters is case-sensitive);
* AQuA keeps the upstream "first capital A–E anywhere" rule by default, with a stricter opt-in rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskInfo:
    """How a task is scored: ``family`` is "math", "aqua" or "commonsense"; ``labels`` are the answer words the
    extractor looks for (for commonsense sets: every label of the family, as upstream's regexes)."""

    family: str
    labels: tuple[str, ...] = ()


_ANSWERS = tuple(f"answer{i}" for i in range(1, 6))

#: Canonical task names (the dataset directory names) → scoring. ``hellaswag`` is scored like upstream but its
#: test set is not part of the shared LLM-Adapters data here, so it is not in the task groups or the bundle.
TASKS: dict[str, TaskInfo] = {
    "AddSub": TaskInfo("math"),
    "MultiArith": TaskInfo("math"),
    "SingleEq": TaskInfo("math"),
    "gsm8k": TaskInfo("math"),
    "SVAMP": TaskInfo("math"),
    "mawps": TaskInfo("math"),
    "AQuA": TaskInfo("aqua", ("A", "B", "C", "D", "E")),
    "boolq": TaskInfo("commonsense", ("true", "false")),
    "piqa": TaskInfo("commonsense", ("solution1", "solution2")),
    "social_i_qa": TaskInfo("commonsense", _ANSWERS),
    "hellaswag": TaskInfo("commonsense", tuple(f"ending{i}" for i in range(1, 5))),
    "winogrande": TaskInfo("commonsense", ("option1", "option2")),
    "ARC-Easy": TaskInfo("commonsense", _ANSWERS),
    "ARC-Challenge": TaskInfo("commonsense", _ANSWERS),
    "openbookqa": TaskInfo("commonsense", _ANSWERS),
}

#: |prediction − label| ≤ this counts as correct (upstream's ``miss = 0.001`` with ``<=``).
MATH_TOLERANCE = 0.001

_NUMBER = re.compile(r"-?\d+\.?\d*")
_LETTER_ANYWHERE = re.compile(r"[A-E]")
_LETTER_EXPLICIT = re.compile(r"(?i:answer is)\s*:?\s*\(?([A-E])\b|\(([A-E])\)")
_LETTER_ALONE = re.compile(r"\b([A-E])\b")


def extract_number(text: str) -> float | None:
    """The last number in ``text`` after deleting every comma — upstream's rule, so "1,234.5" → 1234.5, "-15"
    → -15, "4." → 4, but also "3,4" → 34 and "5-3" → -3. ``None`` when there is no (finite) number."""
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return None
    value = float(found[-1])
    return value if math.isfinite(value) else None


def number_is_correct(prediction: float | None, answer: str | float) -> bool:
    """Whether a predicted number matches the record's ``answer`` ("576.0", "-15.0", "1.8333…")."""
    return prediction is not None and abs(prediction - float(answer)) <= MATH_TOLERANCE


def extract_letter(text: str, rule: str = "llm-adapters") -> str | None:
    """The AQuA option letter.

    ``"llm-adapters"`` (default, comparable with published numbers): the first capital A–E *anywhere* in the
    text — so the "A" of "A train …" or "Answer: (C)" wins, which upstream also does. ``"explicit"`` (our
    stricter variant): the last "answer is (X)" / "(X)", else the last standalone capital A–E.
    """
    if rule == "llm-adapters":
        m = _LETTER_ANYWHERE.search(text)
        return m.group(0) if m else None
    if rule == "explicit":
        hits = [a or b for a, b in _LETTER_EXPLICIT.findall(text)] or _LETTER_ALONE.findall(text)
        return hits[-1].upper() if hits else None
    raise ValueError(f"unknown AQuA rule {rule!r}: use 'llm-adapters' or 'explicit'")


def extract_label(text: str, labels: tuple[str, ...] | list[str]) -> str | None:
    """The leftmost of ``labels`` in ``text``, case-insensitive (upstream: ``re.findall("a|b|…")[0]``).

    Like upstream there are no word boundaries: "untrue" yields "true" and "answer12" yields "answer1".
    """
    pattern = "|".join(re.escape(l.lower()) for l in sorted(labels, key=len, reverse=True))
    m = re.search(pattern, text.lower())
    return m.group(0) if m else None


def extract_answer(task: str, text: str, aqua_rule: str = "llm-adapters") -> float | str | None:
    """The prediction in a generated ``text`` for a canonical ``task`` name (a key of :data:`TASKS`)."""
    info = TASKS[task]
    if info.family == "math":
        return extract_number(text)
    if info.family == "aqua":
        return extract_letter(text, aqua_rule)
    return extract_label(text, info.labels)


def is_correct(task: str, prediction: float | str | None, answer: str) -> bool:
    """Whether ``prediction`` (from :func:`extract_answer` or a likelihood choice) matches the record's answer."""
    if prediction is None:
        return False
    if TASKS[task].family == "math":
        return number_is_correct(float(prediction), answer)
    if TASKS[task].family == "aqua":
        return prediction == answer.strip()
    return str(prediction).lower() == answer.strip().lower()
