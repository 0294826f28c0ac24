"""Healing rows for ``sketch_quality.py --heal``: sketch, heal towards the FP model, score before, along and after.

Text split (C4, the calibration file): the last ``heldout_docs`` documents, less every document a sketching
calibration window touches, are the held-out set — never seen by sketching or healing — scored as
perplexity over its first windows, so that healing overfitting its text shows. Healing draws its windows from
the remaining documents (calibration text only; WikiText-2 is never trained on). Each configuration's
sketch, partial heal and curve live under ``--heal-dir`` so a killed run resumes where it stopped.
"""

from __future__ import annotations

import bisect
import copy
import json
import time
from pathlib import Path

import torch
from _common import PeakRSS, write_json, write_text_atomic
from transformers import TrainerCallback

import sketchtune
from sketchtune.eval.perplexity import perplexity
from sketchtune.text import read_documents, read_text
from sketchtune.workflows import heal_job

#: The healing learning rate of the reported rows; rows healed at another one are labelled and cached apart.
DEFAULT_HEAL_LR = 1e-4


def split_c4(tok, calib: str, sketch_windows: int, seqlen: int, seed: int, heldout_docs: int, workdir: Path) -> dict:
    """Write ``heal_text.jsonl`` and ``heldout_c4.jsonl`` (see module docstring); returns their paths and sizes."""
    docs = read_documents(calib)
    text = read_text(calib)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    # The windows sketching drew (sketch.calibration.calibration_tokens draws them exactly so).
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(offsets) - seqlen + 1, (sketch_windows,), generator=gen).tolist()
    doc_starts, pos = [], 0
    for d in docs:
        doc_starts.append(pos)
        pos += len(d) + 2  # the "\n\n" joiner of read_text
    touched = set()
    for s in starts:
        first = bisect.bisect_right(doc_starts, offsets[s][0]) - 1
        last = bisect.bisect_right(doc_starts, offsets[s + seqlen - 1][1] - 1) - 1
        touched.update(range(first, last + 1))
    cut = len(docs) - heldout_docs
    heldout = [i for i in range(cut, len(docs)) if i not in touched]
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {"heal_text": workdir / "heal_text.jsonl", "heldout_c4": workdir / "heldout_c4.jsonl"}
    for key, idx in (("heal_text", range(cut)), ("heldout_c4", heldout)):
        write_text_atomic(paths[key], "".join(json.dumps({"text": docs[i]}) + "\n" for i in idx))
    return {"heal_text": str(paths["heal_text"]), "heldout_c4": str(paths["heldout_c4"]),
            "heal_docs": cut, "heldout_docs": len(heldout), "excluded_heldout_docs": heldout_docs - len(heldout)}


class CurveCallback(TrainerCallback):
    """Scores the model being healed at chosen steps and times the steps; both survive resumes (JSON file).

    ``seconds`` sums the optimizer steps' wall time over every run, resumed ones included (steps redone after
    a kill count again: that is what they cost), with the scoring taken out.
    """

    def __init__(self, score, steps: set[int], path: Path):
        self.score, self.steps, self.path = score, steps, path
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.points, self.seconds, self.timed_steps = saved.get("points", []), saved.get("seconds", 0.0), \
            saved.get("timed_steps", 0)
        self._t = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._t is not None:
            self.seconds += time.perf_counter() - self._t
            self.timed_steps += 1
        step = state.global_step
        if step in self.steps and not any(p["step"] == step for p in self.points):
            model.eval()
            with torch.no_grad():
                self.points.append({"step": step, **self.score(model)})
            model.train()
            print(f"  step {step}: {self.points[-1]}", flush=True)
        write_json(self.path, {"points": self.points, "seconds": self.seconds, "timed_steps": self.timed_steps})


def heal_row(base, tok, cfg: dict, args, split: dict, label: str) -> dict:
    """Sketch ``cfg`` (same protocol as the other rows), heal it, and score it before, during and after."""
    # The step count is in the name: a longer run has another LR schedule, so it cannot resume a shorter one's.
    slug = (f"int{cfg['bits']}-gpr{cfg['gpr']}" + (f"-lr{args.heal_lr:g}" if args.heal_lr != DEFAULT_HEAL_LR else "")
            + f"-{args.heal_steps}steps")
    root = Path(args.heal_dir) / slug
    sketched, healed, state_path = root / "sketched", root / "healed", root / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}

    def score(model) -> dict:
        wiki = perplexity(model, tok, args.eval_data, args.eval_seqlen, args.eval_windows, progress=False)
        held = perplexity(model, tok, split["heldout_c4"], args.eval_seqlen, args.eval_windows, progress=False)
        return {"wikitext2_ppl": wiki.ppl, "heldout_c4_ppl": held.ppl, "heldout_c4_tokens": held.tokens}

    if "before" not in state:
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        sketchtune.sketch_model(model, tok, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                                seed=args.seed, device=args.device, progress=not args.quiet,
                                **{k: v for k, v in cfg.items() if k in ("method", "bits", "gpr", "refit")})
        sketchtune.save(model, tok, sketched, dtype="float16", overwrite=True)
        del model
        state["sketch_seconds"] = time.perf_counter() - t0
        state["before"] = score(sketchtune.load(sketched, dtype=torch.float32)[0])
        write_json(state_path, state)
    print(f"{label}: before {state['before']}", flush=True)

    if "after" not in state:
        curve = CurveCallback(score, set(args.heal_curve), root / "curve.json")
        resume = (healed.parent / f".{healed.name}.healing").is_dir()
        with PeakRSS() as mem:  # the teacher, the student, their logits and the optimizer state together
            job = heal_job(sketched, args.model, healed, calib=split["heal_text"], nsamples=args.heal_nsamples,
                           seqlen=args.seqlen, seed=1, resume=resume, overwrite=not resume and healed.exists(),
                           max_steps=args.heal_steps, learning_rate=args.heal_lr,
                           per_device_train_batch_size=args.heal_batch, save_steps=args.heal_save_steps,
                           logging_steps=10, callbacks=[curve])
        state["healing"] = {
            "steps": job.metrics["global_step"], "tokens": job.metrics["global_step"] * args.heal_batch * args.seqlen,
            "healing_windows": args.heal_nsamples, "learning_rate": args.heal_lr, "batch": args.heal_batch,
            "seconds": curve.seconds, "seconds_per_step": curve.seconds / max(1, curve.timed_steps),
            "threads": torch.get_num_threads(), "peak_rss_bytes": mem.peak,
            "resumed": job.resumed_from is not None, "kl_before": job.kl_before, "kl_after": job.kl_after,
            "kl_eval_tokens": job.eval_tokens,
        }
        state["curve"] = [{"step": 0, **state["before"]}] + curve.points
        state["after"] = score(sketchtune.load(healed, dtype=torch.float32)[0])
        write_json(state_path, state)
    return {"label": label, **cfg, "healed": True, "sketch_seconds": state["sketch_seconds"],
            "wikitext2_ppl": state["after"]["wikitext2_ppl"], "heldout_c4_ppl": state["after"]["heldout_c4_ppl"],
            "before": state["before"], "healing": state["healing"], "curve": state["curve"], "split": split}
