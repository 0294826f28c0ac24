"""Downstream-task accuracy with the LLM-Adapters protocol (the math and commonsense tables of SketchTune).

Each record of ``<data_dir>/<task>/test.json`` (or ``<data_dir>/<task>.json``) is put in the Alpaca prompt and
answered one of two ways:

* ``generate`` — batched greedy decoding (left padding, only new tokens decoded) and the upstream answer
  extraction of :mod:`sketchtune.eval.answers`. Upstream decodes with 4-beam search at temperature 0.1; greedy
  is deterministic, cheaper, and what most re-evaluations use, so expect small differences from published
  numbers.
* ``likelihood`` (commonsense sets only; math still generates) — every candidate label of the record's
  "Answer format: …" line is scored as the continuation of the prompt plus "the correct answer is", the way the
  training targets read, and the one with the highest total log-likelihood is the prediction. No parsing can
  fail and small models are not penalised for rambling, so it is cheaper and less noisy.

Works for any causal LM with ``generate``: plain Hugging Face models, sketched models (``SketchedLinear`` is an
ordinary module) and peft models alike. Prompts longer than the model's context minus ``max_new_tokens`` are
cut from the left (keeping BOS), so the "### Response:" cue always survives.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..bundled import BUNDLED_TASKS, TASKS_DIR_ENV, default_tasks_dir
from ..errors import SketchError
from ..prompts import format_prompt
from .answers import TASKS, extract_answer, is_correct

MATH_TASKS = ("AddSub", "MultiArith", "SingleEq", "gsm8k", "AQuA", "SVAMP", "mawps")
COMMONSENSE_TASKS = ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
TASK_GROUPS = {"math": MATH_TASKS, "commonsense": COMMONSENSE_TASKS, "all": MATH_TASKS + COMMONSENSE_TASKS}
#: Extra spellings, compared after lower-casing and dropping "-", "_" and spaces.
ALIASES = {"siqa": "social_i_qa", "socialiqa": "social_i_qa", "arce": "ARC-Easy", "arcc": "ARC-Challenge",
           "obqa": "openbookqa", "gsm": "gsm8k", "wino": "winogrande"}
MODES = ("generate", "likelihood")
DEFAULT_MAX_NEW_TOKENS = {"math": 256, "aqua": 256, "commonsense": 32}
#: What the LLM-Adapters commonsense targets say before the label ("the correct answer is answer3").
ANSWER_PREFIX = "the correct answer is"


def _key(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.lower())


_BY_KEY = {_key(n): n for n in TASKS} | ALIASES


def resolve_task(name: str) -> str:
    """The canonical task name for any spelling ("GSM8K", "siqa", "arc-e", "obqa" …)."""
    canonical = _BY_KEY.get(_key(name))
    if canonical is None:
        raise SketchError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)} "
                          f"(or groups: {', '.join(TASK_GROUPS)})")
    return canonical


def resolve_tasks(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Canonical names, in order and without repeats, from a list or a comma-separated string; the groups
    ``math``, ``commonsense`` and ``all`` expand to the LLM-Adapters suites present in the shared data."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        group = TASK_GROUPS.get(item.lower())
        for name in group if group else [resolve_task(item)]:
            if name not in names:
                names.append(name)
    if not names:
        raise SketchError(f"no tasks given; valid tasks: {', '.join(TASKS)}")
    return names


def task_file(name: str, data_dir: str | os.PathLike) -> Path:
    """``<data_dir>/<name>/test.json`` (the LLM-Adapters layout) or ``<data_dir>/<name>.json`` (the bundle)."""
    name, root = resolve_task(name), Path(data_dir).expanduser()
    if not root.is_dir():
        raise SketchError(f"no such data directory: {root}")
    for path in (root / name / "test.json", root / f"{name}.json"):
        if path.is_file():
            return path
    raise SketchError(f"no test set for {name} in {root} (looked for {name}/test.json and {name}.json)")


def load_task(name: str, data_dir: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The first ``limit`` records (all when ``None``) of a task's test set, checked for the fields we need."""
    if limit is not None and limit < 1:
        raise SketchError(f"limit must be ≥ 1, got {limit}")
    path = task_file(name, data_dir)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SketchError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get("instruction"), str) and "answer" in r for r in records
    ):
        raise SketchError(f"{path} is not an LLM-Adapters test set (a list of {{instruction, input, answer}})")
    if not records:
        raise SketchError(f"{path} has no records")
    return records[:limit] if limit is not None else records


def record_prompt(record: dict) -> str:
    return format_prompt(record["instruction"], record.get("input") or "")


def candidate_labels(task: str, record: dict) -> list[str]:
    """The labels a commonsense record offers: its "Answer format: a/b/c" line (ARC has 3 to 5 options per
    question), else every label of the task."""
    labels = TASKS[task].labels
    formats = re.findall(r"Answer format:\s*([\w/]+)", record["instruction"])
    offered = [l for l in formats[-1].lower().split("/") if l in labels] if formats else []
    return offered if len(offered) >= 2 else list(labels)


# --------------------------------------------------------------------------------------------------- model side


def _context_limit(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise SketchError("the tokenizer has neither a pad nor an eos token")
    return pad


def truncate_left(ids: list[int], keep: int, bos: int | None) -> list[int]:
    """The last ``keep`` ids of an over-long prompt (its question and answer cue), keeping a leading BOS."""
    if len(ids) <= keep:
        return ids
    if bos is not None and ids[0] == bos:
        return ids[:1] + ids[len(ids) - keep + 1 :]
    return ids[len(ids) - keep :]


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                   desc: str = "generate", progress: bool = True) -> list[str]:
    """Greedy continuations of ``prompts``, decoded without the prompt.

    Prompts are sorted by length so batches carry little padding, and left-padded by hand (pad = eos when the
    tokenizer has none) rather than by changing the tokenizer, which training code may share.
    """
    limit, bos, pad = _context_limit(model), tokenizer.bos_token_id, _pad_id(tokenizer)
    keep = None if limit is None else limit - max_new_tokens
    if keep is not None and keep < 1:
        raise SketchError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a {limit}-token context")
    encoded = [tokenizer(p).input_ids for p in prompts]
    if keep is not None:
        encoded = [truncate_left(ids, keep, bos) for ids in encoded]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]) :] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for i, text in zip(rows, texts):
            outputs[i] = text.strip()
    return outputs


def _common_prefix(sequences: list[list[int]]) -> int:
    n = 0
    for column in zip(*sequences):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, contexts: list[str], choices: list[list[str]], batch_size: int = 8,
                          desc: str = "score", progress: bool = True) -> list[list[float]]:
    """Log-likelihood of each ``" " + choice`` after its context: one list of scores per context.

    Each ``context + " " + choice`` is encoded whole, as in training, so a merge across the boundary ("is▁")
    can put the last context token into the continuation. Every choice is therefore scored from the longest
    token prefix shared by the context and all its choices: the scores differ from full-string
    log-likelihoods by one common term, so they rank the choices exactly as those would.
    """
    limit, bos, pad = _context_limit(model), tokenizer.bos_token_id, _pad_id(tokenizer)
    items = []  # (context index, choice index, ids, scored length)
    for c, (context, options) in enumerate(zip(contexts, choices)):
        wholes = [tokenizer(context + " " + option).input_ids for option in options]
        shared = min(_common_prefix([tokenizer(context).input_ids, *wholes]), min(map(len, wholes)) - 1)
        for j, ids in enumerate(wholes):
            n = len(ids) - shared
            if limit is not None:
                ids = truncate_left(ids, limit, bos)
            items.append((c, j, ids, min(n, len(ids) - 1)))
    items.sort(key=lambda it: -len(it[2]))
    device = next(model.parameters()).device
    scores = [[0.0] * len(options) for options in choices]
    for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress):
        batch = items[start : start + batch_size]
        width = max(len(it[2]) for it in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (_, _, seq, _) in enumerate(batch):  # right padding: positions of real tokens are unchanged
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for r, (c, j, seq, n) in enumerate(batch):
            end = len(seq)
            logprobs = F.log_softmax(logits[r, end - n - 1 : end - 1].float(), dim=-1)
            target = ids[r, end - n : end].to(logprobs.device)
            scores[c][j] = float(logprobs.gather(-1, target[:, None]).sum())
    return scores


def evaluate_tasks(model, tokenizer, tasks: str | list[str], data_dir: str | os.PathLike, limit: int | None = None,
                   batch_size: int = 8, max_new_tokens: int | None = None, mode: str = "generate",
                   progress: bool = True, aqua_rule: str = "llm-adapters") -> dict:
    """Accuracy of ``model`` on each task, and their unweighted mean (the "Avg." column of the papers).

    ``max_new_tokens`` defaults per family: 256 for math and AQuA, 32 for commonsense (LLM-Adapters' values).
    Returns ``{"mode", "data_dir", "limit", "average", "tasks": {name: {"family", "method", "accuracy",
    "correct", "total", "predictions": [{"index", "answer", "prediction", "correct", "output" | "scores"}]}}}``
    with accuracies as fractions. Every task file is read before the first forward pass, so a typo fails fast.
    """
    if mode not in MODES:
        raise SketchError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if batch_size < 1:
        raise SketchError(f"batch_size must be ≥ 1, got {batch_size}")
    names = resolve_tasks(tasks)
    data = {name: load_task(name, data_dir, limit) for name in names}
    was_training = model.training
    model.eval()
    try:
        per_task = {name: _evaluate_one(model, tokenizer, name, data[name], batch_size, max_new_tokens, mode,
                                        progress, aqua_rule) for name in names}
    finally:
        model.train(was_training)
    average = sum(r["accuracy"] for r in per_task.values()) / len(per_task)
    return {"mode": mode, "data_dir": str(data_dir), "limit": limit, "average": average, "tasks": per_task}


def _evaluate_one(model, tokenizer, name, records, batch_size, max_new_tokens, mode, progress, aqua_rule) -> dict:
    family = TASKS[name].family
    prompts = [record_prompt(r) for r in records]
    predictions = []
    if mode == "likelihood" and family == "commonsense":
        method = "likelihood"
        options = [candidate_labels(name, r) for r in records]
        contexts = [p + ANSWER_PREFIX for p in prompts]
        scores = choice_loglikelihoods(model, tokenizer, contexts, options, batch_size, name, progress)
        for i, (record, opts, sc) in enumerate(zip(records, options, scores)):
            best = opts[max(range(len(opts)), key=sc.__getitem__)]
            predictions.append({"index": i, "answer": record["answer"], "prediction": best,
                                "correct": is_correct(name, best, record["answer"]), "scores": dict(zip(opts, sc))})
    else:
        method = "generate"
        n_new = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[family]
        outputs = generate_batch(model, tokenizer, prompts, n_new, batch_size, name, progress)
        for i, (record, text) in enumerate(zip(records, outputs)):
            pred = extract_answer(name, text, aqua_rule)
            predictions.append({"index": i, "answer": record["answer"], "prediction": pred,
                                "correct": is_correct(name, pred, record["answer"]), "output": text})
    correct = sum(p["correct"] for p in predictions)
    return {"family": family, "method": method, "accuracy": correct / len(records), "correct": correct,
            "total": len(records), "predictions": predictions}


def format_results_table(results: dict) -> str:
    """Per-task and average accuracy (in %) as a fixed-width table."""
    lines = [f"{'task':<16}{'method':<12}{'correct':>9}{'total':>8}{'accuracy':>10}"]
    for name, r in results["tasks"].items():
        lines.append(f"{name:<16}{r['method']:<12}{r['correct']:>9}{r['total']:>8}{100 * r['accuracy']:>9.1f}%")
    label = f"average ({len(results['tasks'])} tasks)"
    lines.append(f"{label:<45}{100 * results['average']:>9.1f}%")
    return "\n".join(lines)


def resolve_tasks_dir(arg: str | os.PathLike | None) -> Path:
    """The LLM-Adapters dataset directory: ``arg``, ``"bundled"`` (the 8-record slices in the package), or
    ``$SKETCHTUNE_TASKS_DIR``; never a guessed workspace path."""
    if arg is not None and str(arg) == "bundled":
        return BUNDLED_TASKS
    if arg is not None:
        return Path(arg).expanduser()
    env = default_tasks_dir()
    if env is None:
        raise SketchError(f"no task data directory: pass --data-dir DIR (the LLM-Adapters 'dataset' folder), set "
                          f"{TASKS_DIR_ENV}, or use --data-dir bundled for the 8-record slices shipped with sketchtune")
    return env
