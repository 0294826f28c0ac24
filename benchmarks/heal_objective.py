"""Which healing objective: forward vs reverse KL, temperature 1 vs 2, measured on the bundled model.

The bundled TinyStories-656K is sketched at INT2 GPR1 (16 × 128 C4 calibration tokens, the case with most to
heal), then healed three ways for the same 150 steps (64 C4 windows of 128 tokens, batch 4, lr 1e-3):
KL(teacher‖student) at T = 1, KL(student‖teacher) at T = 1, KL(teacher‖student) at T = 2. Each healed
checkpoint is scored, after reloading, on C4 windows never used for healing (forward and reverse KL to the
teacher) and on TinyStories perplexity (the model's own domain; 40 windows of 256 tokens). The defaults of
``sketchtune heal`` follow this table; ``benchmarks/sketch_quality.py`` holds the SmolLM2 figures.

    python benchmarks/heal_objective.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import machine_meta, write_json

from sketchtune.bundled import BUNDLED_MODEL
from sketchtune.checkpoint import load
from sketchtune.cli import main as cli
from sketchtune.eval.perplexity import perplexity
from sketchtune.modeling import load_model
from sketchtune.sketch.calibration import calibration_tokens
from sketchtune.train.heal import mean_kl
from sketchtune.workflows import heal_job

CONFIGS = [("forward", 1.0), ("reverse", 1.0), ("forward", 2.0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "heal_objective.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    teacher, tok = load_model(BUNDLED_MODEL, dtype=torch.float32)
    held = calibration_tokens(tok, "c4", 16, 128, seed=12345)

    def score(model) -> dict:
        return {"kl_forward_heldout": mean_kl(model, teacher, held),
                "kl_reverse_heldout": mean_kl(model, teacher, held, direction="reverse"),
                "ppl_tinystories": perplexity(model, tok, "tinystories", 256, 40, progress=False).ppl}

    rows = [{"config": "teacher (fp32)", **score(teacher)}]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "int2"
        cli(["sketch", "--bits", "2", "--out", str(base), "--nsamples", "16", "--seqlen", "128", "--eval-data", "",
             "--threads", "1"])
        rows.append({"config": "INT2 GPR1, not healed", **score(load(base, dtype=torch.float32)[0])})
        for direction, temperature in CONFIGS:
            out = Path(tmp) / f"{direction}-{temperature}"
            job = heal_job(base, None, out, nsamples=64, seqlen=128, max_steps=args.steps, learning_rate=1e-3,
                           temperature=temperature, direction=direction, logging_steps=50, save_steps=10_000,
                           disable_tqdm=True)
            rows.append({"config": f"healed, {direction} KL, T={temperature:g}", "seconds": job.metrics["seconds"],
                         **score(load(out, dtype=torch.float32)[0])})
    write_json(args.out, {"benchmark": "heal_objective", "steps": args.steps, "machine": machine_meta(), "rows": rows})
    print(f"{'':34}{'KL fwd':>9}{'KL rev':>9}{'ppl TS':>9}")
    for r in rows:
        print(f"{r['config']:34}{r['kl_forward_heldout']:>9.4f}{r['kl_reverse_heldout']:>9.4f}"
              f"{r['ppl_tinystories']:>9.2f}")


if __name__ == "__main__":
    main()
