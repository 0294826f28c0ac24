"""Sketch quality on SmolLM2-135M: perplexity, time, memory and bytes for SketchTune vs RTN and GPTQ.

Protocol (issue #2): calibration 32 × 512 tokens of C4 (seed 0); WikiText-2 test perplexity over the first
40 windows of 512 tokens; every configuration is sketched from the same full-precision model in this one
run, saved as an fp16 checkpoint, reloaded, and evaluated from the reloaded checkpoint — what a user gets.
``--heal`` adds healed rows (``sketchtune heal``, issue #13): the default k-means sketch at INT4/3/2 × GPR1/4 healed
towards the FP model on C4 documents sketching and evaluation never see, scored on WikiText-2 and on held-out C4
documents before, along (``--heal-curve`` steps) and after healing (see ``_healing.py``).
``--sweep-s`` adds the k-means importance-exponent sweep (s ∈ {0..4}, both importance definitions);
``--embeddings`` adds rows that sketch the tied token embedding / LM head too (``--sketch-embeddings``), each
also scored with the dense table put back over the very same decoder sketch, so the table's own cost shows;
``--paper-importance`` reruns every sketch row with the paper's importance as written; ``--calib-rows NxL``
re-sketches ``--calib-configs`` (default INT3 GPR4 k-means) calibrated on N windows of L tokens drawn from the
healing documents, so the held-out C4 documents stay unseen (does more calibration lift the sketch?);
``--resume`` keeps the rows already in ``--out``.

    python benchmarks/sketch_quality.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import psutil
import torch
from _common import PeakRSS, write_json
from _healing import DEFAULT_HEAL_LR, heal_row, split_c4

import sketchtune
from sketchtune.eval.perplexity import perplexity
from sketchtune.info import describe
from sketchtune.modeling import load_model
from sketchtune.sketch.pipeline import DEFAULT_IMPORTANCE, DEFAULT_S

GGUF = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"

def _sk(bits: int, gpr: int, refit: bool) -> dict:
    return dict(method="sketch", bits=bits, gpr=gpr, refit=refit)


# Ordered so that a run cut short still answers the main questions: INT4 GPR1 k-means (the default) and refit
# rows at every bit width and GPR first, the baselines beside them, then the remaining k-means rows. Sketch rows
# use the library's DEFAULT_S and DEFAULT_IMPORTANCE, recorded in each row.
MAIN_CONFIGS = [
    dict(method="rtn", bits=4, gpr=1, refit=False), dict(method="rtn", bits=3, gpr=1, refit=False),
    dict(method="gptq", bits=4, gpr=1, refit=False), _sk(4, 1, False), _sk(4, 1, True),
    _sk(4, 4, True), _sk(3, 1, True), dict(method="gptq", bits=3, gpr=1, refit=False), _sk(2, 1, True),
    _sk(3, 4, True), _sk(2, 4, True),
    _sk(3, 1, False), _sk(4, 4, False), _sk(2, 1, False), _sk(3, 4, False), _sk(2, 4, False),
]
# The importance-exponent sweep on INT4 GPR1 k-means (no refit, so the codebooks are k-means' own). s = 0 is
# unweighted k-means under either definition; the default pair is the main "INT4 GPR1 k-means" row.
SWEEP_CONFIGS = [
    dict(method="sketch", bits=4, gpr=1, refit=False, s=s, importance=imp)
    for imp in ("paper", "cholesky") for s in (0.0, 1.0, 2.0, 3.0, 4.0)
    if not (imp == "cholesky" and s == 0.0) and not (imp == DEFAULT_IMPORTANCE and s == DEFAULT_S)
]
# The token embedding and LM head sketched too: the default and the two GPR4 rows with healing targets.
EMBEDDING_CONFIGS = [dict(_sk(4, 1, False), embeddings=True), dict(_sk(4, 4, False), embeddings=True),
                     dict(_sk(3, 4, False), embeddings=True, embedding_bits=3),  # below the 4-bit default: costs more
                     dict(_sk(3, 4, False), embeddings=True, embedding_bits=4),
                     dict(_sk(4, 1, False), embeddings=True, embedding_gpr=4)]
# Every sketch configuration again with the paper's importance as written, (1/[H⁻¹]ᵢᵢ)^3.
PAPER_IMPORTANCE_CONFIGS = [dict(cfg, s=3.0, importance="paper") for cfg in MAIN_CONFIGS if cfg["method"] == "sketch"]
# Healing: the three configurations with targets in issue #13 first, then the other three.
HEAL_CONFIGS = [_sk(2, 4, False), _sk(3, 4, False), _sk(4, 1, False), _sk(4, 4, False), _sk(3, 1, False),
                _sk(2, 1, False)]
# More calibration (--calib-rows): INT3 GPR4, the middle healing target, unless --calib-configs says otherwise.
CALIB_CONFIGS = [_sk(3, 4, False)]


def _pick(configs: list[dict], spec: str | None) -> list[dict]:
    """``"BITS:GPR,…"`` picks (and orders) a subset of ``configs``; None keeps them all."""
    if not spec:
        return configs
    wanted = [tuple(int(v) for v in item.split(":")) for item in spec.split(",")]
    return [c for w in wanted for c in configs if (c["bits"], c["gpr"]) == w]


def _calib_size(text: str) -> tuple[int, int]:
    try:
        n, length = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--calib-rows wants NxL (windows x tokens), e.g. 128x2048; got {text!r}") from None
    return n, length


def label(cfg: dict) -> str:
    if cfg.get("healed"):
        lr = cfg.get("heal_lr", DEFAULT_HEAL_LR)
        base = {k: v for k, v in cfg.items() if k not in ("healed", "heal_lr", "heal_steps")}
        return (f"{label(base)} healed" + (f" lr {lr:g}" if lr != DEFAULT_HEAL_LR else "")
                + (f", {cfg['heal_steps']} steps" if "heal_steps" in cfg else ""))
    name = {"sketch": "SketchTune", "rtn": "RTN", "gptq": "GPTQ-uniform"}[cfg["method"]]
    parts = [name, f"INT{cfg['bits']}", f"GPR{cfg['gpr']}"]
    if cfg["method"] == "sketch":
        parts.append("refit" if cfg.get("refit") else "k-means")
        if "s" in cfg:
            parts.append(f"s={cfg['s']:g}/{cfg['importance']}")
    if cfg.get("embeddings"):
        table = " ".join(([f"INT{cfg['embedding_bits']}"] if cfg.get("embedding_bits") else [])
                         + ([f"GPR{cfg['embedding_gpr']}"] if cfg.get("embedding_gpr") else []))
        parts.append(f"+ {table} embeddings" if table else "+ embeddings")
    calib = cfg.get("calibration")
    return " ".join(parts) + (f", calibration {calib['nsamples']}x{calib['seqlen']}" if calib else "")


def run_config(base, tok, cfg, args, workdir: Path) -> dict:
    model = copy.deepcopy(base)
    kwargs = {k: v for k, v in cfg.items() if k in ("method", "bits", "gpr", "refit", "s", "importance", "embeddings",
                                                  "embedding_bits", "embedding_gpr")}
    calib = cfg.get("calibration") or {}  # a --calib-rows row: its own text (recorded as "path") and size
    with PeakRSS() as mem:
        report = sketchtune.sketch_model(
            model, tok, calib=calib.get("path", args.calib), nsamples=calib.get("nsamples", args.nsamples),
            seqlen=calib.get("seqlen", args.seqlen), seed=calib.get("seed", args.seed),
            device=args.device, progress=not args.quiet, **kwargs,
        )
    out = workdir / "ckpt"
    sketchtune.save(model, tok, out, dtype="float16", overwrite=True)
    del model
    info = describe(out)
    reloaded, _ = sketchtune.load(out, dtype=torch.float32, device=args.device)
    ppl = perplexity(reloaded, tok, args.eval_data, args.eval_seqlen, args.eval_windows, progress=False)
    extra = {}
    if cfg.get("embeddings"):  # the same decoder sketch with the dense (tied) table put back: the table's own cost
        spec = reloaded.config.quantization_config.embeddings
        table, head = copy.deepcopy((base.get_submodule(spec["input"]), base.get_submodule(spec["output"])))
        extra = {"embeddings_rel_error": report.module_errors[spec["output"]],
                 "dense_table_wikitext2_ppl": None}
        for name, module in ((spec["input"], table), (spec["output"], head)):
            parent, _, child = name.rpartition(".")
            setattr(reloaded.get_submodule(parent) if parent else reloaded, child, module.to(args.device))
        extra["dense_table_wikitext2_ppl"] = perplexity(reloaded, tok, args.eval_data, args.eval_seqlen,
                                                        args.eval_windows, progress=False).ppl
    return {
        "label": label(cfg), **cfg,
        **({"s": DEFAULT_S, "importance": DEFAULT_IMPORTANCE, **cfg} if cfg["method"] == "sketch" else {}),
        "wikitext2_ppl": ppl.ppl, "sketch_seconds": report.seconds,
        "peak_rss_bytes": mem.peak, "peak_rss_over_model_bytes": mem.peak - args.base_rss,
        "peak_device_bytes": report.peak_device_bytes, "mean_rel_layer_error": report.mean_error,
        "checkpoint_weight_bytes": info["weights_bytes_on_disk"], "sketched_bytes": info["sketched_bytes"],
        "sketched_fp16_bytes": info["sketched_fp16_bytes"],
        "sketched_over_fp16": info["sketched_bytes"] / info["sketched_fp16_bytes"],
        "trainable_params": info["trainable_params"], **extra,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--model", default=None, help=f"default: DATA_DIR/{GGUF}")
    p.add_argument("--calib", default=None, help="default: DATA_DIR/c4/c4_sample_1000.jsonl")
    p.add_argument("--eval-data", default=None, help="default: DATA_DIR/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sweep-s", action="store_true", help="also sweep the importance exponent s")
    p.add_argument("--only-sweep", action="store_true", help="run only the s sweep")
    p.add_argument("--paper-importance", action="store_true",
                   help="also rerun every sketch configuration with the paper's (1/[H^-1]_ii)^3 importance")
    p.add_argument("--embeddings", action="store_true", help="also run rows with sketched embeddings")
    p.add_argument("--only-embeddings", action="store_true", help="run only the sketched-embeddings rows")
    p.add_argument("--heal", action="store_true", help="also run the healed rows (HEAL_CONFIGS)")
    p.add_argument("--only-heal", action="store_true", help="run only the healed rows")
    p.add_argument("--heal-steps", type=int, default=200)
    p.add_argument("--heal-lr", type=float, default=DEFAULT_HEAL_LR,
                   help="healing learning rate; rows healed at another one are labelled and cached apart")
    p.add_argument("--heal-batch", type=int, default=4)
    p.add_argument("--heal-nsamples", type=int, default=512, help="healing windows of --seqlen tokens")
    p.add_argument("--heal-curve", type=int, nargs="*", default=[25, 50, 100, 150, 200, 300, 400],
                   help="healing steps at which the curve is scored")
    p.add_argument("--heal-save-steps", type=int, default=25, help="resumable checkpoint every N healing steps")
    p.add_argument("--heal-configs", default=None, help="BITS:GPR,… — heal only these, in this order")
    p.add_argument("--heal-dir", default="benchmarks/cache/heal", help="sketches and partial heals (resumable)")
    p.add_argument("--calib-rows", nargs="*", default=[], metavar="NxL",
                   help="also sketch --calib-configs calibrated on N windows of L tokens of the healing documents")
    p.add_argument("--calib-configs", default=None, help="BITS:GPR,… for --calib-rows (default: 3:4)")
    p.add_argument("--only-calib-rows", action="store_true", help="run only the --calib-rows rows")
    p.add_argument("--heldout-docs", type=int, default=100, help="last C4 documents kept out of everything")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--limit", type=int, default=None, help="run only the first N configurations (smoke test)")
    p.add_argument("--out", default="benchmarks/results/sketch_quality.json")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and run only the rest")
    args = p.parse_args()
    data = Path(args.data_dir)
    args.model = args.model or str(data / GGUF)
    args.calib = args.calib or str(data / "c4" / "c4_sample_1000.jsonl")
    args.eval_data = args.eval_data or str(data / "wikitext-2-raw" / "wiki.test.raw")

    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok = load_model(args.model, dtype=torch.float32)
    args.base_rss = psutil.Process().memory_info().rss
    rows = json.loads(Path(args.out).read_text())["rows"] if args.resume and Path(args.out).is_file() else []
    done = {r["label"] for r in rows}
    if "FP32 (dequantized GGUF)" not in done:
        fp = perplexity(base.to(args.device), tok, args.eval_data, args.eval_seqlen, args.eval_windows, progress=False)
        base.to("cpu")
        rows.insert(0, {"label": "FP32 (dequantized GGUF)", "method": "fp", "wikitext2_ppl": fp.ppl})
    only = args.only_sweep or args.only_heal or args.only_embeddings or args.only_calib_rows
    configs = (([] if only else MAIN_CONFIGS)
               + (EMBEDDING_CONFIGS if args.embeddings or args.only_embeddings else [])
               + (SWEEP_CONFIGS if args.sweep_s or args.only_sweep else [])
               + (PAPER_IMPORTANCE_CONFIGS if args.paper_importance else []))
    configs = configs[: args.limit] if args.limit else configs
    print(f"{'configuration':<44}{'wiki2 ppl':>10}{'time s':>9}{'peak MiB':>10}{'bytes/fp16':>11}")
    for row in rows:
        print(f"{row['label']:<44}{row['wikitext2_ppl']:>10.3f}  (earlier run)" if row["method"] != "fp"
              else f"{row['label']:<44}{row['wikitext2_ppl']:>10.3f}")
    if args.heal or args.only_heal or args.calib_rows:
        split = split_c4(tok, args.calib, args.nsamples, args.seqlen, args.seed, args.heldout_docs, Path(args.heal_dir))
    if args.calib_rows:
        source = (f"C4, the first {split['heal_docs']} documents of the calibration file (the healing text; "
                  "the held-out documents stay untouched)")
    for size in args.calib_rows:
        n, length = _calib_size(size)
        configs += [dict(cfg, calibration={"source": source, "nsamples": n, "seqlen": length, "seed": args.seed,
                                           "path": split["heal_text"]})
                    for cfg in _pick(CALIB_CONFIGS, args.calib_configs)]
    if args.heal or args.only_heal:
        heal_configs = _pick(HEAL_CONFIGS, args.heal_configs)
        for cfg in heal_configs[: args.limit] if args.limit and args.only_heal else heal_configs:
            name = label(dict(cfg, healed=True, heal_lr=args.heal_lr, heal_steps=args.heal_steps))
            if name in done:
                continue
            row = heal_row(base, tok, cfg, args, split, name)
            rows.append(row)
            h = row["healing"]
            print(f"{name:<44}{row['before']['wikitext2_ppl']:>10.3f} -> {row['wikitext2_ppl']:.3f} wiki2, "
                  f"held-out C4 {row['before']['heldout_c4_ppl']:.3f} -> {row['heldout_c4_ppl']:.3f}, "
                  f"{h['steps']} steps {h['seconds']:.0f} s", flush=True)
            _write(args, rows)
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs:
            if label(cfg) in done:
                continue
            row = run_config(base, tok, cfg, args, Path(tmp))
            rows.append(row)
            print(f"{row['label']:<44}{row['wikitext2_ppl']:>10.3f}{row['sketch_seconds']:>9.1f}"
                  f"{row['peak_rss_over_model_bytes'] / 2**20:>10.0f}{row['sketched_over_fp16']:>11.3f}", flush=True)
            _write(args, rows)
    _write(args, rows)


def _write(args, rows) -> None:
    meta = {
        "model": os.path.basename(args.model), "calibration": f"{args.nsamples}x{args.seqlen} C4 seed {args.seed}",
        "eval": f"WikiText-2 test, first {args.eval_windows} windows of {args.eval_seqlen}",
        "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sketchtune": sketchtune.__version__,
    }
    write_json(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
