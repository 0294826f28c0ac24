"""The Alpaca prompt template that LLM-Adapters and SketchTune fine-tune and evaluate with.

Training and evaluation both import :func:`format_prompt`, so a model is always asked in exactly the format it
was tuned on. The text is the canonical Alpaca template. LLM-Adapters writes it as indented triple-quoted
f-strings, so its prompts carry 16 spaces before every line after the first (and differ by a trailing space
between its ``finetune.py`` and ``evaluate.py``); SketchTune's evaluation scripts drop the indentation but keep
a space after "request." and a literal ``"<s> "``. We reproduce neither accident: the tokenizer adds BOS.
"""

from __future__ import annotations

#: The plain-text prompt of the main job's sample generation (the bundled model writes children's stories).
DEFAULT_PROMPT = "Once upon a time"

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002  (the datasets' field name)
    """The prompt up to and including ``"### Response:\\n"``; the ``### Input:`` variant when ``input`` is set."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT.format(instruction=instruction)
