"""``sketchtune`` command line: sketch, ppl, info, train, eval-tasks, analyze-delta, generate.

Only argument parsing and printing: every command calls a library function (:mod:`sketchtune.workflows` and
friends) and prints what it returns. Every user error is a :class:`SketchError` printed as one line
(``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import SketchError
from .prompts import DEFAULT_PROMPT
from .threads import free_cores
from .train import HEAL_LEARNING_RATE


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _scheduler_types() -> list[str]:
    from transformers import SchedulerType

    return [t.value for t in SchedulerType]


#: ``sketchtune train`` flags named as in ``transformers.TrainingArguments`` (dashes for underscores):
#: (flag, type, default, help).
TRAINING_FLAGS = [
    ("--max-steps", int, -1, "optimizer steps; -1 trains --num-train-epochs epochs instead"),
    ("--num-train-epochs", float, 3.0, "epochs over the training data (when --max-steps is -1)"),
    ("--learning-rate", float, 8e-5, "peak learning rate of the codebooks"),
    ("--per-device-train-batch-size", int, 4, "examples per step and device"),
    ("--per-device-eval-batch-size", int, 4, "examples per evaluation batch"),
    ("--gradient-accumulation-steps", int, 1, "micro-batches per optimizer step"),
    ("--warmup-steps", int, 0, "linear warm-up steps"),
    ("--lr-scheduler-type", str, "linear", "learning-rate schedule"),
    ("--weight-decay", float, 0.0, "AdamW weight decay"),
    ("--max-grad-norm", float, 1.0, "gradient clipping norm"),
    ("--logging-steps", int, 10, "log the training loss every N steps"),
    ("--save-steps", int, 100, "write a resumable checkpoint every N steps"),
    ("--save-total-limit", int, 2, "keep at most N checkpoints"),
    ("--eval-steps", int, None, "evaluate every N steps (default: --save-steps)"),
    ("--seed", int, 42, "seed of data order and dropout"),
]


def _training_flags(parser: argparse.ArgumentParser, **defaults) -> None:
    for flag, kind, default, help_text in TRAINING_FLAGS:
        extra = {"choices": _scheduler_types()} if flag == "--lr-scheduler-type" else {}
        parser.add_argument(flag, type=kind, default=defaults.get(flag, default), help=help_text, **extra)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads for torch (default: the cores not busy with other work at start)")
    return common


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="sketchtune", description="Sketch, evaluate and run SketchTune models.",
                                formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"sketchtune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    common = _common_options()

    def command(name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002
        return sub.add_parser(name, help=help, description=help, formatter_class=fmt, parents=[common])

    sk = command("sketch", "sketch a causal LM (default: the bundled TinyStories-656K)")
    sk.add_argument("model", nargs="?", default=None, help="HF directory, .gguf file or hub id (default: bundled)")
    sk.add_argument("--out", default=None, help="output directory (default: ./sketched-<model>-int<bits>-gpr<gpr>)")
    sk.add_argument("--overwrite", action="store_true", help="replace an existing sketched checkpoint at --out")
    sk.add_argument("--resume", action="store_true",
                    help="continue a killed sketch into --out after its last finished layer (same settings)")
    sk.add_argument("--stream", action="store_true",
                    help="never hold the whole model: read one decoder layer at a time from the safetensors "
                         "shards and write the checkpoint layer by layer (memory independent of depth; "
                         "skips perplexity and sample)")
    sk.add_argument("--heal-steps", type=int, default=0,
                    help="then heal the sketch for N steps towards MODEL on --calib (see `sketchtune heal`)")
    sk.add_argument("--sketch-embeddings", action="store_true",
                    help="sketch the token embedding and the LM head too (one table when tied): a smaller model "
                         "in memory, at some perplexity (README: Sketching the embeddings)")
    sk.add_argument("--embedding-bits", type=int, default=None,
                    help="bits of the sketched embedding table (default: --bits, at least 4; implies --sketch-embeddings)")
    sk.add_argument("--embedding-gpr", type=int, default=None,
                    help="groups per row of the sketched embedding table (default: --gpr; implies --sketch-embeddings)")
    sk.add_argument("--bits", type=int, default=4, help="bits per code: 2, 3 or 4")
    sk.add_argument("--gpr", type=int, default=1, help="groups per row; must divide every row length")
    sk.add_argument("--calib", default="c4", help="calibration text: .txt/.jsonl/.json or the bundled 'c4'")
    sk.add_argument("--nsamples", type=_positive_int, default=128, help="calibration sequences")
    sk.add_argument("--seqlen", type=_positive_int, default=2048,
                    help="calibration sequence length, capped at the model's context")
    sk.add_argument("--method", choices=["sketch", "gptq", "rtn"], default="sketch",
                    help="sketch (SketchTune), or the gptq / rtn uniform-grid baselines")
    sk.add_argument("--s", type=float, default=None, help="k-means importance exponent (default: tuned, see README)")
    sk.add_argument("--importance", choices=["paper", "cholesky"], default=None,
                    help="importance (1/[H^-1]_ii)^s as in the paper, or diag(U)^-s as in LeanQuant "
                         "(default: cholesky)")
    sk.add_argument("--refit", action=argparse.BooleanOptionalAction, default=False,
                    help="replace k-means codebooks by the least-squares optimum for the final codes (off by "
                         "default: it lowers the calibration error but raised held-out perplexity in 4 of 6 "
                         "SmolLM2 configurations, see README)")
    sk.add_argument("--percdamp", type=float, default=0.01, help="Hessian damping, fraction of mean diagonal")
    sk.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                    help="dtype of codebooks and other weights in the saved checkpoint")
    sk.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    sk.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    sk.add_argument("--eval-data", default="wikitext2,tinystories",
                    help="comma-separated texts for the before/after perplexity table ('' to skip)")
    sk.add_argument("--eval-seqlen", type=_positive_int, default=256, help="perplexity window length")
    sk.add_argument("--eval-windows", type=_positive_int, default=40, help="perplexity windows per text")
    sk.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for the sample generation")

    pp = command("ppl", "perplexity of a model or sketched directory")
    pp.add_argument("model", help="HF / sketched directory, .gguf file or hub id")
    pp.add_argument("--data", default="wikitext2", help="text file or bundled name: wikitext2, c4, tinystories")
    pp.add_argument("--seqlen", type=_positive_int, default=2048, help="window length, capped at the model's context")
    pp.add_argument("--max-windows", type=_positive_int, default=None, help="score at most N windows (default: all)")
    pp.add_argument("--batch-size", type=_positive_int, default=4, help="windows per forward pass")
    pp.add_argument("--device", default=None, help="default: cuda if available, else cpu")

    inf = command("info", "describe a sketched checkpoint")
    inf.add_argument("dir", help="sketched checkpoint directory")
    inf.add_argument("--json", action="store_true", help="print JSON instead of a table")

    tr = command("train", "fine-tune the codebooks of a sketched model (HF Trainer)")
    tr.add_argument("model", help="sketched checkpoint directory")
    tr.add_argument("--data", required=True,
                    help="comma-separated JSON/JSONL instruction files (LLM-Adapters or GSM8K fields) or .txt files")
    tr.add_argument("--out", required=True, help="run directory: adapter, checkpoints, train_results.json")
    tr.add_argument("--eval-data", default=None, help="held-out file(s) for eval loss (same formats as --data)")
    tr.add_argument("--val-set-size", type=int, default=0, help="hold out this many training examples instead")
    tr.add_argument("--cutoff-len", type=_positive_int, default=256, help="max tokens per example")
    tr.add_argument("--train-on-inputs", action="store_true", help="also take the loss on prompt tokens")
    tr.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    tr.add_argument("--overwrite", action="store_true", help="start over in an --out that holds an earlier run")
    tr.add_argument("--save-full", action="store_true", help="also write a full sketched checkpoint to OUT/full")
    tr.add_argument("--fsdp", action="store_true",
                    help="under torchrun: shard the codebooks and their optimizer state across processes "
                         "(FSDP2; the packed codes stay whole on every rank)")
    _training_flags(tr)
    precision = tr.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 autocast (codebooks stay fp32 masters)")
    precision.add_argument("--fp16", action="store_true", help="fp16 autocast (codebooks stay fp32 masters)")
    tr.add_argument("--device", default=None, help="default: cuda if available, else cpu")

    add_eval_tasks_arguments(command("eval-tasks", "math / commonsense accuracy (LLM-Adapters sets)"))

    hl = command("heal", "distil a sketched model's codebooks towards its full-precision teacher (codes frozen)")
    hl.add_argument("model", help="sketched checkpoint directory")
    hl.add_argument("--teacher", default=None,
                    help="full-precision model (default: the model the sketch was made from)")
    hl.add_argument("--out", required=True, help="output directory of the healed checkpoint (may be MODEL "
                                                 "itself with --overwrite)")
    hl.add_argument("--calib", default="c4", help="healing text (calibration text only, never evaluation sets)")
    hl.add_argument("--nsamples", type=_positive_int, default=128, help="healing windows")
    hl.add_argument("--seqlen", type=_positive_int, default=512, help="tokens per window")
    hl.add_argument("--eval-data", default=None, help="held-out text for the KL before/after (default: other "
                                                      "windows of --calib)")
    hl.add_argument("--eval-windows", type=_positive_int, default=8, help="windows for the KL before/after")
    hl.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (loss × T²)")
    hl.add_argument("--direction", choices=["forward", "reverse"], default="forward",
                    help="KL(teacher||student) (forward) or KL(student||teacher)")
    hl.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                    help="dtype of codebooks in the saved checkpoint")
    hl.add_argument("--resume", action="store_true", help="continue a killed heal into --out")
    hl.add_argument("--overwrite", action="store_true", help="replace --out (or start a partial heal over)")
    hl.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    _training_flags(hl, **{"--max-steps": 200, "--learning-rate": HEAL_LEARNING_RATE, "--seed": 1})

    ad = command("analyze-delta", "rank / sketch analysis of a fine-tuning update BASE -> TUNED")
    ad.add_argument("base", help="dense model, or a sketched checkpoint")
    ad.add_argument("tuned", help="fine-tuned dense model; for a sketched BASE: a sketch adapter (run directory "
                                  "or .safetensors) or a sketched checkpoint")
    ad.add_argument("--sketch", default=None, help="sketched checkpoint of a dense BASE whose code mapping to use")
    ad.add_argument("--bits", type=int, default=4, help="bits of the mappings computed from a dense BASE")
    ad.add_argument("--gpr", default="1,2,4,8", help="GPRs for mappings computed from a dense BASE (without --sketch)")
    ad.add_argument("--max-layers", type=_positive_int, default=None, help="analyse only the first N linears")
    ad.add_argument("--out", default="delta-analysis", help="directory for delta_analysis.json and the plots")
    ad.add_argument("--no-plots", action="store_true", help="skip the PNG plots (and the matplotlib requirement)")

    ap = command("apply-adapter", "write BASE with a sketch adapter's codebooks as a full sketched checkpoint "
                                  "(what vLLM and other tools load)")
    ap.add_argument("base", help="the sketched checkpoint the adapter was trained on")
    ap.add_argument("adapter", help="sketch adapter: a train run directory or its sketch_adapter.safetensors")
    ap.add_argument("--out", required=True, help="directory for the full sketched checkpoint")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                    help="dtype of codebooks and dense tensors in the output (default: the base's)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing sketched checkpoint at --out")

    gen = command("generate", "generate text")
    gen.add_argument("model", help="HF / sketched directory, .gguf file or hub id")
    gen.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt (the instruction with --template alpaca)")
    gen.add_argument("--template", choices=["none", "alpaca"], default="none",
                     help="wrap the prompt in the Alpaca template that `train` uses for instruction data")
    gen.add_argument("--input", default="", help="the record's input field, with --template alpaca")
    gen.add_argument("--adapter", default=None, help="sketch adapter (directory or .safetensors) to apply")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --do-sample)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def cmd_sketch(args) -> None:
    from .workflows import sketch_job

    job = sketch_job(
        args.model, args.out, overwrite=args.overwrite, bits=args.bits, gpr=args.gpr, calib=args.calib,
        nsamples=args.nsamples, seqlen=args.seqlen, method=args.method, s=args.s, importance=args.importance,
        refit=args.refit, percdamp=args.percdamp, dtype=args.dtype, device=args.device, seed=args.seed,
        eval_data=tuple(args.eval_data.split(",")), eval_seqlen=args.eval_seqlen, eval_windows=args.eval_windows,
        prompt=args.prompt, resume=args.resume, stream=args.stream, heal_steps=args.heal_steps,
        embeddings=args.sketch_embeddings or args.embedding_bits is not None or args.embedding_gpr is not None,
        embedding_bits=args.embedding_bits, embedding_gpr=args.embedding_gpr,
    )
    info, report = job.info, job.report
    print(f"\nSketched {job.source} -> {job.out}  ({report.method}, INT{report.bits}, GPR {report.gpr}, "
          f"{report.seconds:.1f} s)")
    if job.perplexity:
        print(f"\n{'perplexity (seqlen ' + str(job.eval_seqlen) + ')':<34}{'before':>10}{'after':>10}")
        for name, (before, after) in job.perplexity.items():
            print(f"{name:<34}{before:>10.2f}{after:>10.2f}")
    print(f"\nsketched layers: {_mb(info['sketched_fp16_bytes'])} fp16 -> {_mb(info['sketched_bytes'])} "
          f"({info['compression_vs_fp16']:.2f}x smaller); checkpoint {_mb(info['dir_bytes_on_disk'])}")
    print(f"trainable parameters (codebooks): {info['trainable_params']:,}")
    if info["embeddings"]:
        print(f"embeddings: {_embeddings_line(info)}")
    print(f"mean relative layer-output error: {report.mean_error:.3e}")
    if job.healing is not None:
        h = job.healing
        print(f"healed {h.metrics['global_step']} steps: KL to {job.source} on {h.eval_tokens:,} held-out tokens "
              f"{h.kl_before:.4f} -> {h.kl_after:.4f}")
    _print_left_dense(report.left_dense)
    if job.sample is None:
        print(f"\nstreamed: perplexity and sample skipped (they need the whole model); "
              f"run `sketchtune ppl {job.out}` to measure")
    else:
        print(f"\nsample: {job.prompt!r} -> {job.sample!r}")


def cmd_ppl(args) -> None:
    from .eval.perplexity import perplexity
    from .modeling import load_model, resolve_device

    model, tok = load_model(args.model, device=resolve_device(args.device))
    r = perplexity(model, tok, args.data, args.seqlen, args.max_windows, args.batch_size)
    print(f"perplexity {r.ppl:.4f}  ({args.data}: {r.windows} windows x {r.seqlen} tokens, {r.tokens} scored)")


def cmd_info(args) -> None:
    from .info import describe

    info = describe(args.dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    calib = info.get("calibration") or {}
    rows = [
        ("architecture", info["architecture"]),
        ("source model", info.get("source_model") or "(not recorded)"),
        ("calibration", (f"{calib.get('source')}: {calib.get('nsamples')} x {calib.get('seqlen')} tokens, "
                         f"seed {calib.get('seed')}") if calib else "none (round-to-nearest)"),
        ("bits / gpr", f"{info['bits']} / {info['gpr']}"),
        ("importance / s / refit", f"{info['importance']} / {info['s']} / {info['refit']}"),
        ("decoder layers / sketched modules", f"{info['decoder_layers']} / {info['sketched_modules']}"),
        ("sketched weights (fp16)", _mb(info["sketched_fp16_bytes"])),
        ("codes + codebooks", _mb(info["sketched_bytes"])),
        ("compression vs fp16", f"{info['compression_vs_fp16']:.2f}x"),
        ("trainable parameters", f"{info['trainable_params']:,}"),
        ("embeddings", _embeddings_line(info) if info["embeddings"] else "dense"),
        ("size on disk", _mb(info["dir_bytes_on_disk"])),
    ]
    for k, v in rows:
        print(f"{k:<36}{v}")
    _print_left_dense(info["left_dense"])


def _embeddings_line(info: dict) -> str:
    spec = info["embeddings"]
    what = f"{spec['input']} (tied {spec['output']})" if spec["tied"] else f"{spec['input']} and {spec['output']}"
    return (f"{what} sketched at INT{spec.get('bits', info['bits'])} GPR {spec.get('gpr', info['gpr'])}, "
            f"{_mb(info['embedding_table_bytes'])}")


def _print_left_dense(left: dict[str, str]) -> None:
    if not left:
        print("every weight matrix inside the decoder layers is sketched")
        return
    print(f"left dense inside the decoder layers ({len(left)} matrices):")
    for name, why in left.items():
        print(f"  {name}: {why}")


def cmd_train(args) -> None:
    from .workflows import train_job

    training = {f[2:].replace("-", "_"): getattr(args, f[2:].replace("-", "_")) for f, *_ in TRAINING_FLAGS}
    job = train_job(
        args.model, args.data, args.out, eval_data=args.eval_data, val_set_size=args.val_set_size,
        cutoff_len=args.cutoff_len, train_on_inputs=args.train_on_inputs, resume=args.resume,
        overwrite=args.overwrite, save_full=args.save_full, fsdp=args.fsdp, device=args.device, notify=print,
        bf16=args.bf16, fp16=args.fp16, **training,
    )
    m = job.metrics
    if not m.get("main_process", True):
        return  # another rank of a torchrun job: rank 0 reports (and wrote the adapter)
    print(f"\ntrained {m['trainable_params']:,} codebook parameters for {m['global_step']} steps "
          f"({m['seconds_per_step']:.3f} s/step); train loss {m['train_loss']:.4f}"
          + (f", eval loss {m['eval_loss']:.4f}" if "eval_loss" in m else ""))
    print(f"sketch adapter: {job.adapter}")


def cmd_heal(args) -> None:
    from .workflows import heal_job

    training = {f[2:].replace("-", "_"): getattr(args, f[2:].replace("-", "_")) for f, *_ in TRAINING_FLAGS}
    seed = training.pop("seed")
    job = heal_job(
        args.model, args.teacher, args.out, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
        seed=seed, eval_data=args.eval_data, eval_windows=args.eval_windows, temperature=args.temperature,
        direction=args.direction, resume=args.resume, overwrite=args.overwrite, dtype=args.dtype,
        device=args.device, notify=print, **training,
    )
    print(f"\nhealed {job.out}: {job.metrics['global_step']} steps on {job.train_tokens:,} calibration tokens "
          f"in {job.metrics['seconds']:.0f} s")
    print(f"KL to the teacher on {job.eval_tokens:,} held-out tokens: {job.kl_before:.4f} -> {job.kl_after:.4f}")


def cmd_apply_adapter(args) -> None:
    from .workflows import apply_adapter_job

    out = apply_adapter_job(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}: {args.base} with the codebooks of {args.adapter}")


def cmd_generate(args) -> None:
    from .workflows import generate_job

    prompt, text = generate_job(
        args.model, args.prompt, adapter=args.adapter, template=args.template, input=args.input,
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, device=args.device,
    )
    print(prompt + text)


def cmd_analyze_delta(args) -> None:
    from .analysis.report import analyze_models
    from .layout import check_layout

    try:
        gprs = tuple(int(g) for g in args.gpr.split(","))
    except ValueError:
        raise SketchError(f"--gpr wants comma-separated integers, got {args.gpr!r}") from None
    for g in gprs:
        check_layout(args.bits, g)
    res = analyze_models(args.base, args.tuned, args.out, args.sketch, args.bits, gprs, args.max_layers,
                         plots=not args.no_plots)
    summ = res["summary"]
    print("mean rank needed: " + ", ".join(f"{k} energy {v:.1f}" for k, v in summ["mean_rank_for_energy"].items()))
    print(f"mean power-law exponent eta of sigma^2: {summ['mean_eta']:.3f}")
    print(f"\n{'GPR':>4}{'sketch err':>12}{'low-rank err':>14}{'sketch wins':>13}{'Thm 3.1 agrees':>16}")
    for g, v in summ["by_gpr"].items():
        print(f"{g:>4}{v['sketch_error']:>12.4f}{v['lowrank_error']:>14.4f}{v['sketch_wins']:>8}/{v['layers']:<4}"
              f"{v['theorem_agrees']:>11}/{v['layers']}")
    print(f"\nwrote {Path(args.out) / 'delta_analysis.json'}" + ("" if args.no_plots else " and PNG plots"))


def add_eval_tasks_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``sketchtune eval-tasks`` arguments."""
    from .bundled import TASKS_DIR_ENV
    from .eval.tasks import MODES

    parser.add_argument("model", help="HF / sketched directory, .gguf, hub id, or a peft adapter directory")
    parser.add_argument("--adapter", default=None, help="sketch adapter (directory or .safetensors) to apply")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated task names (gsm8k,AddSub,boolq,siqa,arc-e,…) or math, commonsense, all")
    parser.add_argument("--data-dir", default=None,
                        help=f"LLM-Adapters dataset directory (default: ${TASKS_DIR_ENV}); "
                             "'bundled' for the 8-record slices shipped with the package")
    parser.add_argument("--limit", type=int, default=None, help="first N records of each task (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="records per forward pass")
    parser.add_argument("--mode", choices=MODES, default="generate",
                        help="generate and parse answers, or score the commonsense labels by likelihood")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 256 math, 32 commonsense")
    parser.add_argument("--out", default=None, help="write the results (with every prediction) as JSON")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser


def run_eval_tasks(args: argparse.Namespace) -> int:
    """``sketchtune eval-tasks``: print the accuracy table (and where the JSON went)."""
    from .eval.tasks import format_results_table
    from .workflows import eval_tasks_job

    results = eval_tasks_job(
        args.model, args.tasks, args.data_dir, adapter=args.adapter, limit=args.limit, batch_size=args.batch_size,
        mode=args.mode, max_new_tokens=args.max_new_tokens, out=args.out, device=args.device,
        notify=lambda line: print(line, file=sys.stderr),
    )
    print(format_results_table(results))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_eval_tasks(args) -> None:
    run_eval_tasks(args)


COMMANDS = {
    "sketch": cmd_sketch, "ppl": cmd_ppl, "info": cmd_info, "train": cmd_train, "eval-tasks": cmd_eval_tasks,
    "analyze-delta": cmd_analyze_delta, "generate": cmd_generate, "heal": cmd_heal,
    "apply-adapter": cmd_apply_adapter,
}


def interrupted_message(args) -> str:
    """What an interrupted command leaves behind, said truthfully (saves are atomic; train keeps checkpoints)."""
    if args.command == "train":
        from .train.trainer import latest_complete_checkpoint

        ckpt = latest_complete_checkpoint(args.out)
        if ckpt:
            return (f"interrupted; {ckpt} is kept (step {Path(ckpt).name.split('-')[-1]}): continue with "
                    f"sketchtune train {args.model} --out {args.out} --resume")
        return "interrupted before the first checkpoint was written; nothing to resume"
    if args.command == "heal":
        return (f"interrupted; no healed checkpoint was written; finished training steps are kept in the "
                f"partial heal beside {args.out}: continue with the same command and --resume")
    if args.command == "sketch":
        return ("interrupted; no checkpoint was written (any previous one at --out is unchanged); finished "
                "layers are kept: continue with the same command and --resume")
    return "interrupted"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads or free_cores())
        from .hf_integration import register

        register()  # sketched checkpoints load through transformers' quantizer registry

        t0 = time.perf_counter()
        COMMANDS[args.command](args)
        if args.command == "sketch":
            n = torch.get_num_threads()
            print(f"\ndone in {time.perf_counter() - t0:.1f} s ({n} thread{'s' if n > 1 else ''})")
    except SketchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nerror: {interrupted_message(args)}", file=sys.stderr)  # own line, even after a progress bar
        return 130
    finally:
        from .train.distributed import end_process_group

        end_process_group()  # under torchrun: before the interpreter exits, or gloo may abort it
        torch.set_num_threads(threads_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
