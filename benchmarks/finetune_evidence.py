"""Issue #15: a SketchTune vs LoRA-family comparison whose differences can be told from its noise.

Protocol (one task per invocation; every number in the output JSON is measured by this script):

(a) ``lr``    — per method a 3-point learning-rate grid, short runs (``--lr-fraction`` of the main steps, same
                schedule shape), picked by the loss on a *validation split carved from the training data*
                (never a test record). The grid, every point's validation loss and the pick are in the JSON.
(b) ``main``  — each method × each seed at its picked LR, the same token budget for all
                (steps × batch × cutoff), validation loss logged every ``--eval-every`` steps (learning curves).
                The seed changes data order and initialisation only: the train/validation split and the
                test subsets are fixed by ``--data-seed``.
(c) ``eval``  — accuracy after training (inside each main unit) and before training (one ``base`` unit per
                base: fp32 for LoRA/DoRA/full, NF4 for QLoRA, each sketch), on fixed seeded random subsets of
                each test set: commonsense by likelihood scoring, math by batched greedy generation. Per-record
                correctness is kept so that methods can be compared record by record.
(d) analysis — mean ± std over seeds per method; for SketchTune vs each baseline the same-seed paired
                difference with a 95% t-interval over seeds and a 95% paired bootstrap interval over test
                records (stratified by task, seed-averaged); plateau step per method; a learning-curve PNG.

Every unit (a base evaluation, an LR point, a main run) is written atomically to the JSON as it finishes;
``--resume`` skips finished units, so the run can be killed at any time and continued in a later session
(a unit interrupted mid-way restarts from its beginning). ``--stop-at HH:MM`` (UTC) refuses to start a unit
that is projected to end after that time. Measured s/step per method and the projected CPU hours (total and
remaining) are printed and written to the JSON meta. Several workers may resume the same JSON at once (one per
free core): each claims a unit in the JSON before starting it and merges the others' units whenever it writes
(benchmarks/_workers.py), so the same command started twice runs two units at a time.

    python benchmarks/finetune_evidence.py --task commonsense --threads 1 --resume
    python benchmarks/finetune_evidence.py --task commonsense --analyze-only   # tables/plot from the JSON
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _common import PeakRSS, machine_meta, write_json, write_text_atomic  # noqa: E402
from _workers import claim_is_live, locked, merge_from_disk, my_claim, union  # noqa: E402
from finetune_compare import GGUF, TASKS, build_method, matched_lora_ranks, resolve_method  # noqa: E402

#: 3-point grids, ×√10 apart and centred on each family's customary rate (finetune_compare.LEARNING_RATES and
#: the math LR check: SketchTune best at 3e-4, LoRA best at 1e-3); a pick on a grid edge is flagged.
LR_GRIDS = {
    "sketchtune": [1e-4, 3e-4, 1e-3],
    "lora": [3e-4, 1e-3, 3e-3],
    "dora": [3e-4, 1e-3, 3e-3],
    "qlora": [3e-4, 1e-3, 3e-3],
    "full": [1e-5, 3e-5, 1e-4],
}
#: Priority order: the most informative comparison (GPR 4 vs LoRA at its budget) lands first.
DEFAULT_METHODS = "sketchtune-gpr4,lora,qlora,sketchtune-gpr4-healed,sketchtune-gpr1,lora-gpr1,full,dora"
#: Two-sided 95% Student-t quantiles (df → t_.975); beyond the table the normal 1.96 is close enough.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
#: Settings a resumed run must share with the JSON it continues (else its units would not be comparable).
PROTOCOL_KEYS = ("task", "methods", "seeds", "max_steps", "batch_size", "grad_accum", "cutoff_len", "val_examples",
                 "eval_every", "lr_fraction", "eval_per_task", "max_new_tokens", "data_seed", "calib_nsamples",
                 "warmup_ratio", "likelihood_scorer")


def kind_of(method: str) -> str:
    return method.split("-")[0]


def base_of(method: str) -> str:
    """The frozen base a method trains on (accuracy before training is measured once per base)."""
    kind = kind_of(method)
    if kind == "sketchtune":
        return "sketch-" + method.split("-", 1)[1]  # sketch-gpr4, sketch-gpr4-healed
    return "nf4" if kind == "qlora" else "fp32"


def t975(df: int) -> float:
    if df < 1:
        return float("nan")
    keys = [k for k in sorted(T975) if k <= df]
    return T975[keys[-1]] if df <= 30 else 1.96


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan"))


def t_interval(diffs: list[float]) -> dict:
    m, s = mean_std(diffs)
    half = t975(len(diffs) - 1) * s / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {"mean": m, "std": s, "n": len(diffs), "ci95": [m - half, m + half]}


# ----------------------------------------------------------------------------------------------------- data


def carve(task: dict, tok, args):
    """(train pool, validation split) from the task's training files, fixed by ``--data-seed``."""
    from sketchtune.train.data import build_dataset

    data = Path(args.data_dir)
    full = build_dataset(",".join(str(data / f) for f in task["train"]), tok, args.cutoff_len)
    full = full.shuffle(seed=args.data_seed)
    val = full.select(range(args.val_examples))
    train = full.select(range(args.val_examples, len(full)))
    if args.train_examples:
        train = train.select(range(min(args.train_examples, len(train))))
    return train, val


def eval_subsets(task: dict, args) -> dict[str, list[int]]:
    """Fixed random test-record indices per eval set (seeded, independent of the training seed), written as
    LLM-Adapters test files under the cache so that ``evaluate_tasks`` reads exactly these records."""
    from sketchtune.eval.tasks import load_task

    src = Path(args.data_dir) / "llm-adapters" / "dataset"
    out = {}
    for name in task["eval"]:
        records = load_task(name, src)
        k = min(args.eval_per_task, len(records)) if args.eval_per_task else len(records)
        idx = sorted(random.Random(f"{args.data_seed}-{name}").sample(range(len(records)), k))
        target = subset_dir(args) / name / "test.json"
        payload = json.dumps([records[i] for i in idx], indent=1) + "\n"
        if not target.is_file() or target.read_text() != payload:  # atomic: a parallel worker may be reading it
            write_text_atomic(target, payload)
        out[name] = idx
    return out


def subset_dir(args) -> Path:
    return Path(args.cache) / "evidence" / f"subsets-{args.task}-{args.data_seed}-{args.eval_per_task}"


def likelihood_scorer() -> str:
    """``prefix-once`` when the helpers behind ``evaluate_tasks``' likelihood mode are importable, else
    ``per-choice`` (``evaluate_tasks`` itself). Written into the protocol, so a resumed run cannot mix them."""
    try:
        from sketchtune.eval.tasks import ANSWER_PREFIX, candidate_labels, is_correct, record_prompt  # noqa: F401
    except ImportError:
        return "per-choice"
    return "prefix-once"


@torch.no_grad()
def score_prefix_once(model, tok, name: str, records: list[dict], batch_size: int) -> dict:
    """``evaluate_tasks(mode="likelihood")`` for records whose candidates differ only in their last token.

    ``choice_loglikelihoods`` runs one forward pass per candidate. When every ``context + " " + label`` encodes
    to one shared prefix plus a single differing final token (true of every LLM-Adapters commonsense test
    record with SmolLM2's tokenizer), the candidates' scores differ only in that token's log-probability after
    the shared prefix, so one forward pass per record ranks them identically. Records that do not have this
    shape go through ``choice_loglikelihoods`` unchanged.
    """
    import torch.nn.functional as F
    from sketchtune.eval.tasks import ANSWER_PREFIX, candidate_labels, choice_loglikelihoods, is_correct, record_prompt

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    items, slow = [], []  # items: (record index, prefix ids, final token per option)
    options = [candidate_labels(name, r) for r in records]
    contexts = [record_prompt(r) + ANSWER_PREFIX for r in records]
    for i, (ctx, opts) in enumerate(zip(contexts, options)):
        wholes = [tok(ctx + " " + o).input_ids for o in opts]
        head = wholes[0][:-1]
        if all(len(w) == len(head) + 1 and w[:-1] == head for w in wholes) and len({w[-1] for w in wholes}) == len(wholes):
            items.append((i, head, [w[-1] for w in wholes]))
        else:
            slow.append(i)
    scores: dict[int, list[float]] = {}
    items.sort(key=lambda it: -len(it[1]))
    device = next(model.parameters()).device
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        width = max(len(it[1]) for it in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (_, head, _) in enumerate(batch):  # right padding: real tokens keep their positions
            ids[r, : len(head)] = torch.tensor(head)
            mask[r, : len(head)] = 1
        last = sorted({len(it[1]) - 1 for it in batch})
        try:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                           logits_to_keep=torch.tensor(last, device=device)).logits
            column = {p: j for j, p in enumerate(last)}
        except TypeError:  # a model without logits_to_keep
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            column = {p: p for p in last}
        for r, (i, head, finals) in enumerate(batch):
            logp = F.log_softmax(logits[r, column[len(head) - 1]].float(), dim=-1)
            scores[i] = [float(logp[t]) for t in finals]
    if slow:
        for i, sc in zip(slow, choice_loglikelihoods(model, tok, [contexts[i] for i in slow],
                                                     [options[i] for i in slow], batch_size, name, False)):
            scores[i] = sc
    preds = []
    for i, record in enumerate(records):
        best = options[i][max(range(len(options[i])), key=scores[i].__getitem__)]
        preds.append({"prediction": best, "correct": is_correct(name, best, record["answer"])})
    return {"accuracy": sum(p["correct"] for p in preds) / len(preds), "total": len(preds), "predictions": preds,
            "per_choice_records": len(slow)}


def accuracy(model, tok, task: dict, args) -> dict:
    from sketchtune.eval.tasks import evaluate_tasks, load_task

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    if task["mode"] == "likelihood" and args.likelihood_scorer == "prefix-once":
        tasks = {n: score_prefix_once(model, tok, n, load_task(n, subset_dir(args)), args.eval_batch_size)
                 for n in task["eval"]}
        res = {"tasks": tasks, "average": sum(r["accuracy"] for r in tasks.values()) / len(tasks)}
    else:
        res = evaluate_tasks(model, tok, task["eval"], subset_dir(args), batch_size=args.eval_batch_size,
                             mode=task["mode"], progress=False,
                             max_new_tokens=args.max_new_tokens if task["mode"] == "generate" else None)
    model.train(was_training)
    per = {}
    for name, r in res["tasks"].items():
        preds = [str(p["prediction"]) for p in r["predictions"]]
        counts: dict[str, int] = {}
        for p in preds:
            counts[p] = counts.get(p, 0) + 1
        top = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:6])
        per[name] = {"accuracy": r["accuracy"], "n": r["total"],
                     "correct": "".join("1" if p["correct"] else "0" for p in r["predictions"]),
                     "prediction_counts": top, **({"per_choice_records": r["per_choice_records"]}
                                                   if "per_choice_records" in r else {})}
    return {"avg_accuracy": res["average"], "tasks": per, "eval_seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------- training


def training_args(args, lr: float, steps: int, seed: int) -> dict:
    return dict(max_steps=steps, per_device_train_batch_size=args.batch_size,
                gradient_accumulation_steps=args.grad_accum, learning_rate=lr,
                warmup_steps=max(1, round(steps * args.warmup_ratio)), lr_scheduler_type="linear",
                logging_steps=max(1, args.eval_every // 2), eval_strategy="steps",
                eval_steps=max(1, min(args.eval_every, steps)), save_strategy="no", seed=seed,
                use_cpu=not torch.cuda.is_available(), per_device_eval_batch_size=args.eval_batch_size,
                disable_tqdm=True, report_to=[])


def train_once(method: str, base, tok, train_ds, val_ds, lr: float, steps: int, seed: int, run_dir: Path, args):
    """Build ``method`` fresh, train it; returns (model, facts). The validation loss at step 0 is the base's
    (LoRA/DoRA start at B = 0, sketches at their codebooks), measured once in the base unit."""
    from sketchtune.train.trainer import build_trainer, train_sketch

    torch.manual_seed(seed)
    model, trainable, base_bytes = build_method(method, base, tok, args)
    training = training_args(args, lr, steps, seed)
    t0 = time.perf_counter()
    if kind_of(method) == "sketchtune":
        metrics = train_sketch(model, tok, train_ds, run_dir, val_ds, overwrite=True, **training)
        history = list(metrics["log_history"])
        if not any(h.get("step") == steps and "eval_loss" in h for h in history):  # train_sketch's final evaluate
            history.append({"step": steps, "eval_loss": metrics["eval_loss"], "eval_runtime": 0.0})
    else:
        trainer = build_trainer(model, tok, train_ds, val_ds, run_dir, **training)
        trainer.train()
        if not any(h.get("step") == steps and "eval_loss" in h for h in trainer.state.log_history):
            trainer.evaluate()  # the last point of every curve is the final step (steps % eval_every != 0)
        history = trainer.state.log_history
    seconds = time.perf_counter() - t0
    curve = sorted({h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}.items())
    train_curve = [[h["step"], h["loss"]] for h in history if "loss" in h]
    eval_runtime = sum(h.get("eval_runtime", 0.0) for h in history if "eval_loss" in h and h["step"] in dict(curve))
    n_evals = len([h for h in history if "eval_loss" in h])
    facts = {"trainable_params": trainable, "base_model_bytes": base_bytes, "learning_rate": lr, "steps": steps,
             "val_loss": curve[-1][1] if curve else None, "val_curve": [list(c) for c in curve],
             "train_curve": train_curve, "train_seconds": seconds,
             "seconds_per_step": max(1e-9, seconds - eval_runtime) / steps,
             "val_eval_seconds": eval_runtime / max(1, n_evals)}
    return model, facts


# ------------------------------------------------------------------------------------------------- the units


def plan(methods: list[str], args) -> list[tuple[str, str, dict]]:
    """Units in priority order: for each method (in ``--methods`` order) its base evaluation, LR grid, and
    seeds; the first two methods are interleaved so that their comparison completes before anything else."""
    units: list[tuple[str, str, dict]] = []
    seen_bases: set[str] = set()

    def base_unit(m):
        b = base_of(m)
        if b not in seen_bases:
            seen_bases.add(b)
            units.append((f"base/{b}", "base", {"method": m, "base": b}))

    def lr_units(m):
        for lr in LR_GRIDS[kind_of(m)]:
            units.append((f"lr/{m}/{lr:g}", "lr", {"method": m, "lr": lr}))

    def main_unit(m, s):
        units.append((f"main/{m}/seed{s}", "main", {"method": m, "seed": s}))

    head, rest = methods[:2], methods[2:]
    for m in head:
        base_unit(m)
    for m in head:
        lr_units(m)
    for s in args.seeds:
        for m in head:
            main_unit(m, s)
    for m in rest:
        base_unit(m)
        lr_units(m)
        for s in args.seeds:
            main_unit(m, s)
    phases = set(args.phases.split(","))
    return [u for u in units if u[1] in phases]


def chosen_lr(state: dict, method: str) -> float | None:
    pts = [(u["val_loss"], u["learning_rate"]) for k, u in state["units"].items()
           if k.startswith(f"lr/{method}/") and u.get("val_loss") is not None]
    if len(pts) < len(LR_GRIDS[kind_of(method)]):
        return None
    return min(pts)[1]


def run_unit(uid: str, phase: str, spec: dict, ctx: dict, state: dict, args) -> dict:
    base, tok, train_ds, val_ds, task = ctx["base"], ctx["tok"], ctx["train"], ctx["val"], ctx["task"]
    method = spec["method"]
    run_dir = Path(args.cache) / "evidence" / "runs" / args.task / uid.replace("/", "_")
    if phase == "base":
        from sketchtune.train.trainer import build_trainer

        torch.manual_seed(0)
        with PeakRSS() as mem:
            model, trainable, base_bytes = build_method(method, base, tok, args)
            t0 = time.perf_counter()
            val_loss = build_trainer(model, tok, train_ds, val_ds, run_dir,
                                     **training_args(args, 1e-4, 1, 0)).evaluate()["eval_loss"]
            val_seconds = time.perf_counter() - t0
            model.eval()
            acc = accuracy(model, tok, task, args)
        row = {"base": spec["base"], "built_with": method, "base_model_bytes": base_bytes, "val_loss": val_loss,
               "val_eval_seconds": val_seconds, **acc, "peak_rss_bytes": mem.peak}
        if method in args.healing:  # what building a healed base cost (finetune_compare.healed_base)
            row["healing"] = args.healing[method]
    elif phase == "lr":
        steps = max(1, round(args.max_steps * args.lr_fraction))
        with PeakRSS() as mem:
            model, facts = train_once(method, base, tok, train_ds, val_ds, spec["lr"], steps, args.lr_seed, run_dir, args)
        row = {"method": method, **facts, "seed": args.lr_seed, "peak_rss_bytes": mem.peak}
    else:
        lr = chosen_lr(state, method)
        if lr is None:
            raise RuntimeError(f"{uid}: the LR grid of {method} is not finished")
        with PeakRSS() as mem:
            model, facts = train_once(method, base, tok, train_ds, val_ds, lr, args.max_steps, spec["seed"], run_dir, args)
            model.eval()
            acc = accuracy(model, tok, task, args)
        row = {"method": method, "seed": spec["seed"], **facts, **acc, "peak_rss_bytes": mem.peak}
    del model
    gc.collect()
    return row


# ----------------------------------------------------------------------------------------------- projection


def cost_model(state: dict, methods: list[str], args) -> dict:
    """Seconds per unit from what finished units measured: s/step per method (mean of that method's runs, else
    the mean over measured methods), one validation pass, one accuracy pass (mean over finished ones)."""
    units = state["units"]
    sps: dict[str, list[float]] = {}
    for k, u in units.items():
        if k.startswith(("lr/", "main/")):
            sps.setdefault(u["method"], []).append(u["seconds_per_step"])
    s_per_step = {m: sum(v) / len(v) for m, v in sps.items()}
    vals = [u["val_eval_seconds"] for u in units.values() if u.get("val_eval_seconds")]
    accs = [u["eval_seconds"] for u in units.values() if u.get("eval_seconds")]
    return {"s_per_step": s_per_step,
            "s_per_step_fallback": (sum(s_per_step.values()) / len(s_per_step)) if s_per_step else None,
            "val_eval_seconds": sum(vals) / len(vals) if vals else None,
            "accuracy_eval_seconds": sum(accs) / len(accs) if accs else None}


def unit_seconds(phase: str, spec: dict, cost: dict, args) -> float | None:
    sps = cost["s_per_step"].get(spec["method"], cost["s_per_step_fallback"])
    val, acc = cost["val_eval_seconds"], cost["accuracy_eval_seconds"]
    if phase == "base":
        return None if val is None or acc is None else val + acc
    if sps is None or val is None:
        return None
    steps = args.max_steps if phase == "main" else max(1, round(args.max_steps * args.lr_fraction))
    n_evals = steps // max(1, min(args.eval_every, steps)) + (1 if steps % max(1, min(args.eval_every, steps)) else 0)
    n_evals += 1 if kind_of(spec["method"]) == "sketchtune" and not steps % max(1, min(args.eval_every, steps)) else 0
    return steps * sps + n_evals * val + ((acc or 0.0) if phase == "main" else 0.0)


def projection(state: dict, units: list, methods: list[str], args) -> dict:
    cost = cost_model(state, methods, args)
    total = remaining = 0.0
    unknown = []
    for uid, phase, spec in units:
        done = state["units"].get(uid)
        if done is not None:
            secs = done.get("unit_seconds", 0.0)
        else:
            secs = unit_seconds(phase, spec, cost, args)
            if secs is None:
                unknown.append(uid)
                continue
            remaining += secs
        total += secs
    done = [u for u in state["units"].values() if u.get("unit_cpu_seconds") and u.get("unit_seconds")]
    cpu_per_wall = (sum(u["unit_cpu_seconds"] for u in done) / sum(u["unit_seconds"] for u in done)) if done else args.threads
    return {"measured_s_per_step": cost["s_per_step"], "val_eval_seconds": cost["val_eval_seconds"],
            "accuracy_eval_seconds": cost["accuracy_eval_seconds"],
            "projected_wall_hours_total": total / 3600, "projected_wall_hours_remaining": remaining / 3600,
            "cpu_seconds_per_wall_second": cpu_per_wall,
            "projected_cpu_hours_total": total * cpu_per_wall / 3600,
            "projected_cpu_hours_remaining": remaining * cpu_per_wall / 3600,
            "units_done": sum(1 for u, _, _ in units if u in state["units"]), "units_total": len(units),
            "units_not_yet_projectable": unknown}


# ------------------------------------------------------------------------------------------------- analysis


def _bootstrap_diff(a: dict[str, list[str]], b: dict[str, list[str]], n_boot: int, seed: int) -> dict:
    """Paired bootstrap over test records: ``a``/``b`` map task → per-seed correctness strings (same records,
    same seed order). The statistic is the mean over tasks of the seed-averaged accuracy difference; records
    are resampled within each task (the task structure is fixed), the seeds kept as they are."""
    tasks = list(a)
    per_task = {}
    for t in tasks:
        seeds = len(a[t])
        n = len(a[t][0])
        per_task[t] = [sum(int(a[t][s][i]) - int(b[t][s][i]) for s in range(seeds)) / seeds for i in range(n)]
    point = sum(sum(v) / len(v) for v in per_task.values()) / len(tasks)
    rng = random.Random(seed)
    stats = []
    for _ in range(n_boot):
        tot = 0.0
        for v in per_task.values():
            n = len(v)
            tot += sum(v[rng.randrange(n)] for _ in range(n)) / n
        stats.append(tot / len(tasks))
    stats.sort()
    lo, hi = stats[int(0.025 * n_boot)], stats[min(n_boot - 1, int(0.975 * n_boot))]
    return {"mean": point, "ci95": [lo, hi], "n_boot": n_boot, "records": sum(len(v) for v in per_task.values())}


def plateau_step(curve: list[list[float]], tol: float) -> int | None:
    """First logged step after which the validation loss never falls more than ``tol`` below its value there."""
    for i, (step, loss) in enumerate(curve):
        if all(l >= loss - tol for _, l in curve[i + 1 :]):
            return int(step)
    return None


def mean_curve(rows: list[dict]) -> list[list[float]]:
    by_step: dict[int, list[float]] = {}
    for r in rows:
        for step, loss in r["val_curve"]:
            by_step.setdefault(int(step), []).append(loss)
    n = len(rows)
    return [[s, sum(v) / len(v)] for s, v in sorted(by_step.items()) if len(v) == n]


def analyze(state: dict, methods: list[str], args) -> dict:
    units = state["units"]
    out: dict = {"methods": {}, "bases": {}, "paired_vs_sketchtune": {}}
    for k, u in units.items():
        if k.startswith("base/"):
            out["bases"][u["base"]] = {"val_loss": u["val_loss"], "avg_accuracy": u["avg_accuracy"],
                                       "accuracy": {t: v["accuracy"] for t, v in u["tasks"].items()},
                                       "base_model_bytes": u["base_model_bytes"]}
    mains: dict[str, dict[int, dict]] = {}
    for k, u in units.items():
        if k.startswith("main/"):
            mains.setdefault(u["method"], {})[u["seed"]] = u
    for m in methods:
        grid = {f"{u['learning_rate']:g}": u["val_loss"] for k, u in units.items() if k.startswith(f"lr/{m}/")}
        lr = chosen_lr(state, m)
        entry: dict = {"lr_grid_val_loss": grid, "chosen_lr": lr,
                       "chosen_lr_on_grid_edge": (lr in (min(LR_GRIDS[kind_of(m)]), max(LR_GRIDS[kind_of(m)])))
                       if lr is not None else None}
        rows = [mains[m][s] for s in sorted(mains.get(m, {}))]
        if rows:
            accs, losses = [r["avg_accuracy"] for r in rows], [r["val_loss"] for r in rows]
            curve = mean_curve(rows)
            ps = plateau_step(curve, args.plateau_tol)
            entry.update({
                "seeds": [r["seed"] for r in rows], "base": base_of(m),
                "trainable_params": rows[0]["trainable_params"], "base_model_bytes": rows[0]["base_model_bytes"],
                "avg_accuracy_mean_std": mean_std(accs), "val_loss_mean_std": mean_std(losses),
                "accuracy_mean": {t: sum(r["tasks"][t]["accuracy"] for r in rows) / len(rows) for t in rows[0]["tasks"]},
                "seconds_per_step_mean": sum(r["seconds_per_step"] for r in rows) / len(rows),
                "peak_rss_bytes_max": max(r["peak_rss_bytes"] for r in rows),
                "plateau_step": ps, "plateau_tol": args.plateau_tol,
                "still_improving_in_last_30pct": ps is None or ps > 0.7 * args.max_steps,
            })
        out["methods"][m] = entry
    for sk in [m for m in methods if kind_of(m) == "sketchtune"]:
        # Each baseline, and for a healed sketch its unhealed self (does healing help the fine-tune? #13).
        others = [m for m in methods if kind_of(m) != "sketchtune"]
        if sk.endswith("-healed") and sk.removesuffix("-healed") in methods:
            others = [sk.removesuffix("-healed"), *others]
        for other in others:
            seeds = sorted(set(mains.get(sk, {})) & set(mains.get(other, {})))
            if not seeds:
                continue
            a, b = [mains[sk][s] for s in seeds], [mains[other][s] for s in seeds]
            tasks = list(a[0]["tasks"])
            boot = _bootstrap_diff({t: [r["tasks"][t]["correct"] for r in a] for t in tasks},
                                   {t: [r["tasks"][t]["correct"] for r in b] for t in tasks}, args.n_boot, 0)
            out["paired_vs_sketchtune"][f"{sk} - {other}"] = {
                "seeds": seeds,
                "avg_accuracy_diff_t": t_interval([x["avg_accuracy"] - y["avg_accuracy"] for x, y in zip(a, b)]),
                "avg_accuracy_diff_bootstrap_records": boot,
                "val_loss_diff_t": t_interval([x["val_loss"] - y["val_loss"] for x, y in zip(a, b)]),
                "base_bytes_ratio_other_over_sketchtune": b[0]["base_model_bytes"] / a[0]["base_model_bytes"],
                "trainable_params_ratio_sketchtune_over_other": a[0]["trainable_params"] / b[0]["trainable_params"],
            }
    return out


def plot_curves(state: dict, methods: list[str], args, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    mains: dict[str, list[dict]] = {}
    for k, u in state["units"].items():
        if k.startswith("main/"):
            mains.setdefault(u["method"], []).append(u)
    if not mains:
        return None
    bases = {u["base"]: u["val_loss"] for k, u in state["units"].items() if k.startswith("base/")}
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 4.6))
    for m in methods:
        rows = mains.get(m)
        if not rows:
            continue
        curve = mean_curve(rows)
        full = ([[0, bases[base_of(m)]]] if base_of(m) in bases else []) + curve
        xs, ys = zip(*full)
        line, = ax.plot(xs, ys, marker=".", label=f"{m} (lr {rows[0]['learning_rate']:g}, {len(rows)} seeds)")
        zx, zy = zip(*curve)
        zoom.plot(zx, zy, marker=".", color=line.get_color())
        for r in rows:
            rx, ry = zip(*r["val_curve"])
            zoom.plot(rx, ry, color=line.get_color(), alpha=0.25, linewidth=0.8)
        ps = plateau_step(curve, args.plateau_tol)
        if ps is not None:
            zoom.axvline(ps, color=line.get_color(), linestyle=":", linewidth=0.9)
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="validation loss (log)", title=f"{args.task}: from step 0 (mean of seeds)")
    zoom.set(xlabel="step", ylabel="validation loss",
             title=f"after the first eval; thin = seeds, dotted = plateau (tol {args.plateau_tol:g})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(analysis: dict, proj: dict) -> str:
    lines = [f"{'method':<18}{'lr':>8}{'seeds':>6}{'avg acc':>16}{'val loss':>18}{'plateau':>9}{'s/step':>8}"]
    for m, e in analysis["methods"].items():
        lr = f"{e['chosen_lr']:g}" if e.get("chosen_lr") else "–"
        if "avg_accuracy_mean_std" in e:
            (am, asd), (lm, lsd) = e["avg_accuracy_mean_std"], e["val_loss_mean_std"]
            lines.append(f"{m:<18}{lr:>8}{len(e['seeds']):>6}{am:>9.3f}±{asd:<6.3f}{lm:>10.4f}±{lsd:<7.4f}"
                         f"{str(e['plateau_step']):>9}{e['seconds_per_step_mean']:>8.2f}")
        else:
            lines.append(f"{m:<18}{lr:>8}{0:>6}")
    for b, e in analysis["bases"].items():
        lines.append(f"  before training, base {b}: avg acc {e['avg_accuracy']:.3f}, val loss {e['val_loss']:.4f}")
    for pair, d in analysis["paired_vs_sketchtune"].items():
        t, bt = d["avg_accuracy_diff_t"], d["avg_accuracy_diff_bootstrap_records"]
        lines.append(f"  {pair}: avg acc {t['mean']:+.4f}  t95 [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}] "
                     f"(n={t['n']})  records95 [{bt['ci95'][0]:+.4f}, {bt['ci95'][1]:+.4f}]  "
                     f"val loss {d['val_loss_diff_t']['mean']:+.4f}")
    sps = ", ".join(f"{m} {v:.2f}" for m, v in proj["measured_s_per_step"].items())
    lines.append(f"measured s/step: {sps or '–'}; units {proj['units_done']}/{proj['units_total']}; projected wall hours "
                 f"total {proj['projected_wall_hours_total']:.1f}, remaining {proj['projected_wall_hours_remaining']:.1f} "
                 f"(CPU hours {proj['projected_cpu_hours_total']:.1f} / {proj['projected_cpu_hours_remaining']:.1f} at "
                 f"{proj['cpu_seconds_per_wall_second']:.2f} CPU s per wall s)"
                 + (f" (+{len(proj['units_not_yet_projectable'])} units not yet projectable)"
                    if proj["units_not_yet_projectable"] else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main


def parse_stop_at(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    now = dt.datetime.now(dt.timezone.utc)
    try:
        t = dt.datetime.fromisoformat(text)
        return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
    except ValueError:
        h, m = (int(x) for x in text.split(":"))
        t = now.replace(hour=h, minute=m, second=0, microsecond=0)
        return t if t > now else t + dt.timedelta(days=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--model", default=None, help=f"default: DATA_DIR/{GGUF}")
    p.add_argument("--task", choices=list(TASKS), default="commonsense")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list in priority order; lora/dora/qlora get the rank matching SketchTune GPR 4 "
                        "(-gpr1: GPR 1's budget) unless -rN is given")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (data order and initialisation)")
    p.add_argument("--phases", default="base,lr,main", help="which unit kinds to run")
    p.add_argument("--max-steps", type=int, default=None, help="main-run steps (default per task, see TASK_DEFAULTS)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--cutoff-len", type=int, default=None)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--lr-fraction", type=float, default=None, help="LR-grid runs use this fraction of the steps")
    p.add_argument("--lr-seed", type=int, default=0)
    p.add_argument("--val-examples", type=int, default=None, help="validation split carved from the training data")
    p.add_argument("--train-examples", type=int, default=0, help="cap on the training pool (0: all the rest)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation-loss points")
    p.add_argument("--eval-per-task", type=int, default=None, help="fixed random test records per eval set (0: all)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=160, help="math generation budget")
    p.add_argument("--data-seed", type=int, default=0, help="fixes the train/validation split and test subsets")
    p.add_argument("--calib-nsamples", type=int, default=32)
    p.add_argument("--heal-steps", type=int, default=50, help="healing steps of a -healed method's base (issue #13)")
    p.add_argument("--heal-lr", type=float, default=1e-4)
    p.add_argument("--heal-nsamples", type=int, default=512, help="C4 windows of 512 tokens healing draws from")
    p.add_argument("--plateau-tol", type=float, default=0.005, help="nats; see plateau_step")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--likelihood-scorer", choices=["prefix-once", "per-choice"], default=None,
                   help="commonsense scoring: one pass per record (default when available) or evaluate_tasks' "
                        "one pass per candidate; both rank candidates identically")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (keep 1 on a shared machine)")
    p.add_argument("--cache", default="benchmarks/cache", help="sketched bases, subsets and run directories")
    p.add_argument("--out", default=None, help="default: benchmarks/results/finetune_evidence_<task>.json")
    p.add_argument("--plot", default=None, help="default: beside --out, <stem>_curves.png")
    p.add_argument("--resume", action="store_true", help="continue the JSON at --out, skipping finished units")
    p.add_argument("--stop-at", default=None, help="UTC HH:MM or ISO time: start no unit projected to end later")
    p.add_argument("--max-units", type=int, default=0, help="stop after this many new units (0: no limit)")
    p.add_argument("--analyze-only", action="store_true", help="recompute analysis and plot from --out; no training")
    p.add_argument("--ignore-claims", action="store_true",
                   help="take units other workers have claimed (a claim from a machine that is gone holds 24 h)")
    args = p.parse_args()
    args.healing = {}
    for k, v in TASK_DEFAULTS[args.task].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    args.likelihood_scorer = args.likelihood_scorer or likelihood_scorer()
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/results/finetune_evidence_{args.task}.json")
    plot_path = Path(args.plot) if args.plot else out.with_name(out.stem + "_curves.png")
    protocol = {k: getattr(args, k) for k in PROTOCOL_KEYS}
    if out.is_file():
        if not (args.resume or args.analyze_only):
            p.error(f"{out} exists: pass --resume to continue it (or choose another --out)")
        state = json.loads(out.read_text())
        diff = {k: (state["meta"]["protocol"].get(k), v) for k, v in protocol.items()
                if k != "methods" and state["meta"]["protocol"].get(k) != v}
        if diff and not args.analyze_only:
            p.error(f"--resume with a different protocol than {out} was started with: {diff}")
    elif args.analyze_only:
        p.error(f"nothing to analyse: {out} does not exist")
    else:
        state = {"meta": {"protocol": protocol}, "units": {}}
    stop_at = parse_stop_at(args.stop_at)

    from sketchtune.modeling import load_model

    data = Path(args.data_dir)
    task = TASKS[args.task]
    base, tok = load_model(args.model or str(data / GGUF), dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ranks = matched_lora_ranks(base)
    methods = [resolve_method(m, ranks) for m in args.methods.split(",")]
    units = plan(methods, args)

    lock = out.with_name(f".{out.name}.lock")  # parallel workers on one JSON take turns writing it

    def save(extra_meta: dict | None = None) -> dict:
        with locked(lock):  # merge what other workers wrote since, then write; the JSON covers all their methods
            everyone = union(merge_from_disk(state, out), methods)
            return _save(everyone, extra_meta)

    def _save(everyone: list[str], extra_meta: dict | None) -> dict:
        state["claims"] = {u: c for u, c in state.get("claims", {}).items() if u not in state["units"]}
        full_plan = plan(everyone, argparse.Namespace(**{**vars(args), "phases": "base,lr,main"}))
        proj = projection(state, full_plan, everyone, args)
        state["meta"].update({**machine_meta(), "protocol": {**protocol, "methods": ",".join(everyone)},
                              "methods": everyone, "lora_ranks_by_gpr": ranks,
                              "lr_grids": {m: LR_GRIDS[kind_of(m)] for m in everyone},
                              "chosen_lrs": {m: chosen_lr(state, m) for m in everyone},
                              "token_budget": {"steps": args.max_steps, "batch": args.batch_size * args.grad_accum,
                                               "cutoff_len": args.cutoff_len,
                                               "max_tokens": args.max_steps * args.batch_size * args.grad_accum * args.cutoff_len},
                              "cpu_budget": proj, "data_dir": args.data_dir, "cache": args.cache,
                              **(extra_meta or {})})
        state["analysis"] = analyze(state, everyone, args)
        write_json(out, state)
        plot_curves(state, everyone, args, plot_path)
        return proj

    if args.analyze_only:
        print(summary(analyze(state, methods, args), save()))
        return

    t0 = time.perf_counter()
    train_ds, val_ds = carve(task, tok, args)
    subsets = eval_subsets(task, args)
    state["meta"]["eval_subsets"] = {"indices": subsets, "per_task": args.eval_per_task,
                                     "scoring": task["mode"], "seed": args.data_seed}
    state["meta"]["data"] = {"train_pool": len(train_ds), "val_examples": len(val_ds),
                             "train_files": task["train"], "eval_sets": task["eval"],
                             "setup_seconds": time.perf_counter() - t0}
    ctx = {"base": base, "tok": tok, "train": train_ds, "val": val_ds, "task": task}
    proj = save()
    print(f"task {args.task}: methods {', '.join(methods)}; seeds {args.seeds}; {args.max_steps} steps × batch "
          f"{args.batch_size * args.grad_accum} × cutoff {args.cutoff_len}; val {len(val_ds)} of a {len(train_ds) + len(val_ds)}"
          f"-example training set; test subsets {args.eval_per_task or 'all'} per set; {args.threads} thread(s)", flush=True)
    print(summary(state["analysis"], proj), flush=True)

    def busy_elsewhere(uid: str) -> bool:
        holder = state["claims"].get(uid)
        if not args.ignore_claims and claim_is_live(holder):
            print(f"skip {uid}: worker {holder['pid']} on {holder['host']} runs it since {holder['since']}", flush=True)
            return True
        return False

    def one_pass(new: int) -> tuple[int, bool]:
        """Run the units still open, in plan order; (units run so far, whether to stop)."""
        for uid, phase, spec in units:
            if uid in state["units"]:
                continue
            with locked(lock):  # units (an LR grid) another worker finished or took since the last look
                merge_from_disk(state, out)
            if uid in state["units"] or busy_elsewhere(uid):
                continue
            if phase == "main" and chosen_lr(state, spec["method"]) is None:
                print(f"skip {uid}: its LR grid is unfinished (run the lr phase first)", flush=True)
                continue
            if args.max_units and new >= args.max_units:
                print(f"--max-units {args.max_units} reached", flush=True)
                return new, True
            est = unit_seconds(phase, spec, cost_model(state, methods, args), args)
            if stop_at is not None and est is not None and dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=est) > stop_at:
                print(f"stop: {uid} is projected to take {est / 60:.0f} min and would end after --stop-at "
                      f"{stop_at:%H:%M} UTC", flush=True)
                return new, True
            with locked(lock):  # claim the unit, unless another worker has finished or taken it meanwhile
                merge_from_disk(state, out)
                if uid in state["units"] or busy_elsewhere(uid):
                    continue
                state["claims"][uid] = my_claim()
                write_json(out, state)
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S")
            print(f"[{stamp}] {uid} …" + (f" (projected {est / 60:.0f} min)" if est else ""), flush=True)
            u0, c0 = time.perf_counter(), time.process_time()
            row = run_unit(uid, phase, spec, ctx, state, args)
            row["unit_seconds"] = time.perf_counter() - u0
            row["unit_cpu_seconds"] = time.process_time() - c0  # all of this process's threads
            row["threads"] = args.threads
            row["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            state["units"][uid] = row
            new += 1
            proj = save()
            brief = {k: row[k] for k in ("val_loss", "avg_accuracy", "seconds_per_step", "learning_rate") if k in row}
            print(f"    done in {row['unit_seconds'] / 60:.1f} min: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in brief.items()), flush=True)
            print(summary(state["analysis"], proj), flush=True)
        return new, False

    # Passes until one runs nothing: a unit skipped because another worker held it, or because its LR grid was
    # still running elsewhere, is looked at again once this worker has finished something.
    new, stop = 0, False
    while not stop:
        before = new
        new, stop = one_pass(new)
        stop = stop or new == before
    # The learning-curve plot exists once a main (seeded) run has finished.
    print(f"wrote {out}" + (f" and {plot_path}" if plot_path.is_file() else " (no curves to plot yet)"), flush=True)


#: Defaults per task (every one is a command-line option), sized from s/step measured by tiny smoke runs on
#: the 2-core CPU at 1 thread so that the whole protocol (7 methods: 3 LR points + 3 seeds each, 4 bases) is a
#: bounded one-thread job that resumes across sessions; the JSON meta's cpu_budget holds the measured s/step
#: and the projection. 300 steps × batch 4 = 1,200 training examples per run; whether that converges is what
#: the learning curves (eval every 30 steps, plateau_step) report. 250 records per commonsense set = 1,000
#: paired records; 270 per math set (mawps has 238) keeps the 4-set mean's 95% half-width at about 3 points
#: even at 50% accuracy (less elsewhere).
TASK_DEFAULTS = {
    "commonsense": dict(max_steps=300, batch_size=4, cutoff_len=256, val_examples=96, eval_every=30,
                        lr_fraction=1 / 3, eval_per_task=250),
    "math": dict(max_steps=300, batch_size=4, cutoff_len=256, val_examples=96, eval_every=30,
                 lr_fraction=1 / 3, eval_per_task=270),
}

if __name__ == "__main__":
    sys.exit(main())
