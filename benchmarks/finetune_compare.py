"""SketchTune vs LoRA, DoRA, QLoRA and full fine-tuning on SmolLM2-135M, in one harness.

Every method trains on the same tokenized data, for the same number of steps, with the same batch size,
schedule (linear decay after warmup) and seed, through the same ``transformers.Trainer``; only the trainable
parameters (and each method's customary learning rate, see ``LEARNING_RATES``) differ. Baselines come from
peft (LoRA / DoRA on the fp32 base; QLoRA = LoRA on a bitsandbytes NF4 base, which runs on CPU since
bitsandbytes 0.45). Reported per method: trainable parameters, base-model bytes, held-out eval loss, task
accuracy, peak RSS and seconds per step. ``--save-full-ft`` keeps the fully fine-tuned model for
``sketchtune analyze-delta``.

``sketchtune-gprN-healed`` trains the same sketch after ``sketchtune heal`` (issue #13: does healing help the
later fine-tune or fight it?): ``--heal-steps`` steps of codebook distillation towards the FP model on C4
calibration windows (never the task's data), cached beside the unhealed base and resumed if killed.

    python benchmarks/finetune_compare.py --data-dir ../shared/data --task math
    python benchmarks/finetune_compare.py --task commonsense --methods sketchtune-gpr4,sketchtune-gpr4-healed \
        --out benchmarks/results/finetune_commonsense_healed.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from pathlib import Path

import torch
from _common import PeakRSS, machine_meta, write_json
from _workers import locked

import sketchtune
from sketchtune.eval.tasks import evaluate_tasks
from sketchtune.modeling import load_model
from sketchtune.train.data import build_dataset
from sketchtune.train.trainer import build_trainer, train_sketch

GGUF = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = {
    "math": {
        "train": ["llm-adapters/ft-training_set/math_data.json", "gsm8k/train.jsonl"],
        "eval": ["gsm8k", "SVAMP", "mawps", "AddSub"], "mode": "generate",
    },
    "commonsense": {
        "train": [f"llm-adapters/dataset/{n}/train.json" for n in ("boolq", "openbookqa", "ARC-Easy", "ARC-Challenge")],
        "eval": ["boolq", "openbookqa", "ARC-Easy", "ARC-Challenge"], "mode": "likelihood",
    },
}
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Customary learning rates: codebooks and adapters move little per step; full fine-tuning needs a small LR.
LEARNING_RATES = {"sketchtune": 1e-4, "lora": 3e-4, "dora": 3e-4, "qlora": 3e-4, "full": 2e-5}


def lora_rank_for(params: int, model) -> int:
    """LoRA rank whose trainable-parameter count on the decoder linears is closest to ``params``."""
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LINEARS)
    return max(1, round(params / per_rank))


def matched_lora_ranks(model) -> dict[int, int]:
    """LoRA rank matching SketchTune INT4's codebook budget at GPR 1, 2 and 4 (16 entries per group per row)."""
    rows_total = sum(m.out_features for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LINEARS)
    return {g: lora_rank_for(rows_total * g * 16, model) for g in (1, 2, 4)}


def resolve_method(name: str, ranks: dict[int, int]) -> str:
    """``lora`` → ``lora-r33`` (GPR 4's budget), ``lora-gpr1`` → ``lora-r8``; sketchtune/full/-rN unchanged."""
    if name.startswith(("sketchtune", "full")) or "-r" in name:
        return name
    kind, _, gpr = name.partition("-gpr")
    return f"{kind}-r{ranks[int(gpr or 4)]}"


def nf4_base_bytes(model) -> int:
    """QLoRA's base as it would be stored: packed NF4 weights with their quantisation state, everything else
    at 2 bytes (as the SketchTune checkpoint stores embeddings and norms), so both bases are counted alike."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += p.numel() * p.element_size() + sum(
                t.numel() * t.element_size() for t in state.as_dict(packed=True).values() if torch.is_tensor(t))
        elif p.is_floating_point():
            total += p.numel() * 2
    return total


def fp16_bytes(model) -> int:
    return sum(p.numel() * 2 for p in model.parameters() if p.is_floating_point())


def sketch_base(base, tok, gpr: int, args) -> Path:
    out = Path(args.cache) / f"smollm2-int4-gpr{gpr}"
    with locked(out.with_name(f".{out.name}.lock")):  # parallel evidence workers build it once, not twice at once
        if not (out / "config.json").is_file():
            m = copy.deepcopy(base)
            sketchtune.sketch_model(m, tok, calib=str(Path(args.data_dir) / "c4" / "c4_sample_1000.jsonl"),
                                    nsamples=args.calib_nsamples, seqlen=512, bits=4, gpr=gpr)
            sketchtune.save(m, tok, out, dtype="float16", overwrite=True)
    return out


def healed_base(sketched: Path, args) -> tuple[Path, dict]:
    """``sketched`` healed for ``--heal-steps`` steps (C4 calibration windows, lr ``--heal-lr``, batch 4 × 512);
    resumes a killed heal. Returns the checkpoint and what the healing cost and gained (KL before/after)."""
    out = sketched.with_name(f"{sketched.name}-healed-{args.heal_steps}")
    record = out.with_name(out.name + ".json")
    with locked(out.with_name(f".{out.name}.lock")):
        _heal_once(sketched, out, record, args)
    return out, json.loads(record.read_text()) if record.is_file() else {}


def _heal_once(sketched: Path, out: Path, record: Path, args) -> None:
    from sketchtune.workflows import heal_job

    if not (out / "config.json").is_file():
        resume = (out.parent / f".{out.name}.healing").is_dir()
        t0 = time.perf_counter()
        job = heal_job(sketched, args.model or str(Path(args.data_dir) / GGUF), out,
                       calib=str(Path(args.data_dir) / "c4" / "c4_sample_1000.jsonl"), nsamples=args.heal_nsamples,
                       seqlen=512, seed=1, resume=resume, max_steps=args.heal_steps, learning_rate=args.heal_lr,
                       per_device_train_batch_size=4, save_steps=10, logging_steps=10, dtype="float16")
        write_json(record, {"steps": job.metrics["global_step"], "tokens": job.metrics["global_step"] * 4 * 512,
                            "learning_rate": args.heal_lr, "windows": args.heal_nsamples,
                            "seconds_this_run": time.perf_counter() - t0, "threads": torch.get_num_threads(),
                            "resumed": job.resumed_from is not None, "kl_before": job.kl_before,
                            "kl_after": job.kl_after, "kl_eval_tokens": job.eval_tokens})


def build_method(name: str, base, tok, args):
    """(model, trainable params, base bytes) for one method, ready for the Trainer."""
    kind = name.split("-")[0]
    if kind == "sketchtune":
        gpr = int(name.split("gpr")[1].split("-")[0])
        path = sketch_base(base, tok, gpr, args)
        if name.endswith("-healed"):
            path, args.healing[name] = healed_base(path, args)
        model, _ = sketchtune.load(path, dtype=torch.float32)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        return model, sum(m.codebook.numel() for m in model.modules() if hasattr(m, "codebook")), size
    from peft import LoraConfig, get_peft_model

    if kind == "full":
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(True)
        return model, sum(p.numel() for p in model.parameters()), fp16_bytes(base)
    rank = int(name.split("-r")[1])
    if kind == "qlora":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        fp_dir = Path(args.cache) / "smollm2-fp32"
        with locked(fp_dir.with_name(f".{fp_dir.name}.lock")):
            if not (fp_dir / "config.json").is_file():
                base.save_pretrained(fp_dir)
                tok.save_pretrained(fp_dir)  # a complete HF model: analyze-delta and users load it as such
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                 bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=bnb, dtype=torch.float32)
        # bitsandbytes 0.50 repacks Linear4bit weights for its CPU inference kernel on the first eval-mode
        # forward and never unpacks them for training, whose backward then silently skips the base layers
        # ("gemv_4bit: an autograd kernel was not registered"); keep the trainable layout throughout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        size = nf4_base_bytes(model)
    else:
        model, size = copy.deepcopy(base), fp16_bytes(base)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LINEARS, use_dora=kind == "dora",
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad), size


def run_method(name: str, base, tok, train_ds, eval_ds, task: dict, args) -> dict:
    torch.manual_seed(args.seed)
    kind = name.split("-")[0]
    with PeakRSS() as mem:
        model, trainable, base_bytes = build_method(name, base, tok, args)
        training = dict(max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                        gradient_accumulation_steps=args.grad_accum, learning_rate=args.learning_rates[kind],
                        warmup_steps=max(1, args.max_steps // 10), lr_scheduler_type="linear", logging_steps=5,
                        save_strategy="no", seed=args.seed, use_cpu=not torch.cuda.is_available(),
                        per_device_eval_batch_size=8, disable_tqdm=args.quiet)
        run_dir = Path(args.cache) / "runs" / f"{args.task}-{name}"
        # The starting loss separates what the base costs (sketch / NF4 error) from what training gains.
        eval_before = build_trainer(model, tok, train_ds, eval_ds, run_dir / "before", **training).evaluate()["eval_loss"]
        t0 = time.perf_counter()
        if kind == "sketchtune":
            metrics = train_sketch(model, tok, train_ds, run_dir, eval_ds, **training)
            eval_loss = metrics["eval_loss"]
        else:
            trainer = build_trainer(model, tok, train_ds, eval_ds, run_dir, **training)
            trainer.train()
            eval_loss = trainer.evaluate()["eval_loss"]
        seconds = time.perf_counter() - t0
    model.eval()
    acc = evaluate_tasks(model, tok, task["eval"], Path(args.data_dir) / "llm-adapters" / "dataset",
                         limit=args.eval_limit, batch_size=8, mode=task["mode"], progress=not args.quiet,
                         max_new_tokens=args.max_new_tokens if task["mode"] == "generate" else None)
    if kind == "full" and args.save_full_ft:
        model.save_pretrained(Path(args.cache) / f"full-ft-{args.task}")
        tok.save_pretrained(Path(args.cache) / f"full-ft-{args.task}")
    row = {
        "method": name, "trainable_params": trainable, "base_model_bytes": base_bytes, "eval_loss_before": eval_before,
        "eval_loss": eval_loss, "accuracy": {t: r["accuracy"] for t, r in acc["tasks"].items()}, "avg_accuracy": acc["average"],
        "peak_rss_bytes": mem.peak, "seconds": seconds, "seconds_per_step": seconds / args.max_steps,
    }
    if name in args.healing:
        row["healing"] = args.healing[name]
    del model
    gc.collect()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--model", default=None, help=f"default: DATA_DIR/{GGUF}")
    p.add_argument("--task", choices=list(TASKS), default="math")
    p.add_argument("--methods", default="sketchtune-gpr4,lora,dora,qlora,full,sketchtune-gpr1,lora-gpr1",
                   help="comma list; lora/dora/qlora get the rank matching SketchTune GPR 4 (-gpr1/-gpr2: that "
                        "GPR's budget) unless -rN is given")
    p.add_argument("--train-examples", type=int, default=512)
    p.add_argument("--eval-examples", type=int, default=64, help="held-out examples for eval loss")
    p.add_argument("--eval-limit", type=int, default=25, help="test records per task for accuracy")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--calib-nsamples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="benchmarks/cache", help="sketched bases, runs and the full-FT model")
    p.add_argument("--save-full-ft", action="store_true")
    p.add_argument("--out", default=None, help="default: benchmarks/results/finetune_<task>.json")
    p.add_argument("--lr", action="append", default=[], metavar="KIND=LR",
                   help="override a learning rate, e.g. --lr sketchtune=3e-4 (kinds: " + ", ".join(LEARNING_RATES) + ")")
    p.add_argument("--heal-steps", type=int, default=50, help="healing steps of the -healed methods' base")
    p.add_argument("--heal-lr", type=float, default=1e-4)
    p.add_argument("--heal-nsamples", type=int, default=512, help="C4 windows of 512 tokens healing draws from")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    args.healing = {}
    args.learning_rates = dict(LEARNING_RATES)
    for item in args.lr:
        kind, _, value = item.partition("=")
        if kind not in LEARNING_RATES or not value:
            p.error(f"--lr wants KIND=LR with KIND in {', '.join(LEARNING_RATES)}, got {item!r}")
        args.learning_rates[kind] = float(value)
    data = Path(args.data_dir)
    task = TASKS[args.task]
    base, tok = load_model(args.model or str(data / GGUF), dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    full = build_dataset(",".join(str(data / f) for f in task["train"]), tok, args.cutoff_len).shuffle(seed=args.seed)
    eval_ds = full.select(range(args.eval_examples))
    train_ds = full.select(range(args.eval_examples, args.eval_examples + args.train_examples))
    ranks = matched_lora_ranks(base)  # INT4: 16 codebook entries per group
    rank = ranks[4]
    methods = [resolve_method(m, ranks) for m in args.methods.split(",")]
    out = args.out or f"benchmarks/results/finetune_{args.task}.json"
    rows = []
    header = f"{'method':<18}{'trainable':>12}{'base MiB':>10}{'loss@0':>9}{'eval loss':>11}{'avg acc':>9}{'s/step':>8}{'peak MiB':>10}"
    print(header)
    for name in methods:
        row = run_method(name, base, tok, train_ds, eval_ds, task, args)
        rows.append(row)
        print(f"{name:<18}{row['trainable_params']:>12,}{row['base_model_bytes'] / 2**20:>10.1f}{row['eval_loss_before']:>9.4f}{row['eval_loss']:>11.4f}"
              f"{row['avg_accuracy']:>9.3f}{row['seconds_per_step']:>8.2f}{row['peak_rss_bytes'] / 2**20:>10.0f}", flush=True)
        meta = {**machine_meta(), **vars(args), "lora_rank": rank, "lora_ranks_by_gpr": ranks,
                "learning_rates": args.learning_rates}
        write_json(out, {"meta": meta, "rows": rows})
    by_name = {r["method"]: r for r in rows}
    print("\nSketchTune vs LoRA at the matching trainable-parameter budget:")
    for g in (1, 2, 4):
        sk, lora = by_name.get(f"sketchtune-gpr{g}"), by_name.get(f"lora-r{ranks[g]}")
        if sk and lora:
            print(f"  GPR{g} vs lora-r{ranks[g]}: params x{sk['trainable_params'] / lora['trainable_params']:.2f}  "
                  f"base bytes x{sk['base_model_bytes'] / lora['base_model_bytes']:.2f}  "
                  f"eval loss {sk['eval_loss'] - lora['eval_loss']:+.4f}  "
                  f"avg acc {sk['avg_accuracy'] - lora['avg_accuracy']:+.3f}  "
                  f"s/step x{sk['seconds_per_step'] / lora['seconds_per_step']:.2f}")

if __name__ == "__main__":
    main()
