"""``sketchtune`` command line: sketch, ppl, info, train, eval-tasks, analyze-delta, generate.

Every user error is a :class:`SketchError` printed as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import SketchError

DEFAULT_PROMPT = "Once upon a time"


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


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads for torch (default: the cores not busy with other work at start)")
    return common


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .eval.tasks import add_eval_tasks_arguments

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
    for flag, kind, default, help_text in TRAINING_FLAGS:
        extra = {"choices": _scheduler_types()} if flag == "--lr-scheduler-type" else {}
        tr.add_argument(flag, type=kind, default=default, help=help_text, **extra)
    precision = tr.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 autocast (codebooks stay fp32 masters)")
    precision.add_argument("--fp16", action="store_true", help="fp16 autocast (codebooks stay fp32 masters)")
    tr.add_argument("--device", default=None, help="default: cuda if available, else cpu")

    add_eval_tasks_arguments(command("eval-tasks", "math / commonsense accuracy (LLM-Adapters sets)"))

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


def free_cores(sample_seconds: float = 0.1) -> int:
    """Cores of this process's CPU set that no other work keeps busy, from two /proc/stat samples.

    torch defaults to one thread per core; when another job holds a core, those threads oversubscribe it and
    every parallel region waits for the slowest (the default sketch took 9× longer with one of two cores busy).
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = snapshot()
        time.sleep(sample_seconds)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return n
    machine = os.cpu_count() or n
    busy = (1 - (idle1 - idle0) / max(1, total1 - total0)) * machine
    return max(1, min(n, n - round(busy)))


def _device(name: str | None) -> str:
    import torch

    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise SketchError(f"device {name} requested but CUDA is not available")
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _context_len(model, wanted: int) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(wanted, limit) if limit else wanted


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def cmd_sketch(args) -> None:
    import torch

    from .checkpoint import check_output_dir, load, save
    from .eval.generate import generate
    from .eval.perplexity import perplexity
    from .info import describe
    from .modeling import BUNDLED_MODEL, load_model
    from .sketch.algorithm import check_bits_gpr
    from .sketch.pipeline import DEFAULT_IMPORTANCE, DEFAULT_S, sketch_model

    check_bits_gpr(args.bits, args.gpr)  # before loading anything; divisibility is checked per layer
    spec = args.model or str(BUNDLED_MODEL)
    name = Path(spec).stem if args.model else "tinystories-656k"
    out = Path(args.out or f"sketched-{name}-int{args.bits}-gpr{args.gpr}")
    check_output_dir(out, args.overwrite)  # refuse before an expensive sketch, not after it
    device = _device(args.device)
    model, tok = load_model(spec, dtype=torch.float32, device="cpu")
    evals = [e for e in args.eval_data.split(",") if e]
    eval_seqlen = _context_len(model, args.eval_seqlen)

    def ppl_row(m) -> list[float]:
        return [perplexity(m, tok, e, eval_seqlen, args.eval_windows, progress=False).ppl for e in evals]

    before = ppl_row(model.to(device))
    model.to("cpu")
    report = sketch_model(
        model, tok, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
        bits=args.bits, gpr=args.gpr, s=DEFAULT_S if args.s is None else args.s,
        importance=args.importance or DEFAULT_IMPORTANCE, refit=args.refit, percdamp=args.percdamp,
        method=args.method, seed=args.seed, device=device,
    )
    model.config.quantization_config.source_model = spec
    save(model, tok, out, dtype=args.dtype, overwrite=args.overwrite)
    sketched, _ = load(out, dtype=torch.float32, device=device)
    after = ppl_row(sketched)
    info = describe(out)

    print(f"\nSketched {spec} -> {out}  ({args.method}, INT{args.bits}, GPR {args.gpr}, {report.seconds:.1f} s)")
    if evals:
        print(f"\n{'perplexity (seqlen ' + str(eval_seqlen) + ')':<34}{'before':>10}{'after':>10}")
        for e, b, a in zip(evals, before, after):
            print(f"{e:<34}{b:>10.2f}{a:>10.2f}")
    print(f"\nsketched layers: {_mb(info['sketched_fp16_bytes'])} fp16 -> {_mb(info['sketched_bytes'])} "
          f"({info['compression_vs_fp16']:.2f}x smaller); checkpoint {_mb(info['dir_bytes_on_disk'])}")
    print(f"trainable parameters (codebooks): {info['trainable_params']:,}")
    print(f"mean relative layer-output error: {report.mean_error:.3e}")
    text = generate(sketched, tok, args.prompt, max_new_tokens=48)
    print(f"\nsample: {args.prompt!r} -> {text!r}")


def cmd_ppl(args) -> None:
    from .eval.perplexity import perplexity
    from .modeling import load_model

    model, tok = load_model(args.model, device=_device(args.device))
    seqlen = _context_len(model, args.seqlen)
    r = perplexity(model, tok, args.data, seqlen, args.max_windows, args.batch_size)
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
        ("size on disk", _mb(info["dir_bytes_on_disk"])),
    ]
    for k, v in rows:
        print(f"{k:<36}{v}")


def cmd_train(args) -> None:
    from .checkpoint import load
    from .train.data import build_dataset
    from .train.trainer import prepare_run_dir, resume_checkpoint, train_sketch

    if args.resume and args.overwrite:
        raise SketchError("--resume and --overwrite contradict each other: continue the run, or start over")
    device = _device(args.device)
    model, tok = load(args.model, dtype="auto", device=device)
    if tok is None:
        raise SketchError(f"{args.model} has no tokenizer files")
    if args.resume:  # every check before the data is tokenized
        resume = resume_checkpoint(args.out, model)
        print(f"resuming from {resume} (step {Path(resume).name.split('-')[-1]})")
    else:
        resume = False
        prepare_run_dir(args.out, args.overwrite)
    train_ds = build_dataset(args.data, tok, args.cutoff_len, args.train_on_inputs)
    eval_ds = build_dataset(args.eval_data, tok, args.cutoff_len, args.train_on_inputs) if args.eval_data else None
    if eval_ds is None and args.val_set_size > 0:
        if args.val_set_size >= len(train_ds):
            raise SketchError(f"--val-set-size {args.val_set_size} leaves no training examples of {len(train_ds)}")
        split = train_ds.train_test_split(test_size=args.val_set_size, seed=args.seed)
        train_ds, eval_ds = split["train"], split["test"]
    hf_args = {f[2:].replace("-", "_"): getattr(args, f[2:].replace("-", "_")) for f, *_ in TRAINING_FLAGS}
    hf_args.update(bf16=args.bf16, fp16=args.fp16, use_cpu=device == "cpu")
    metrics = train_sketch(model, tok, train_ds, args.out, eval_ds, resume=resume, save_full=args.save_full,
                           overwrite=args.overwrite, **hf_args)
    print(f"\ntrained {metrics['trainable_params']:,} codebook parameters for {metrics['global_step']} steps "
          f"({metrics['seconds_per_step']:.3f} s/step); train loss {metrics['train_loss']:.4f}"
          + (f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""))
    print(f"sketch adapter: {Path(args.out) / 'sketch_adapter.safetensors'}")


def cmd_generate(args) -> None:
    from .eval.generate import generate
    from .modeling import load_model
    from .prompts import format_prompt

    if args.input and args.template == "none":
        raise SketchError("--input is the record's input field: use it with --template alpaca")
    model, tok = load_model(args.model, device=_device(args.device))
    if args.adapter:
        from .train.adapter import load_adapter

        load_adapter(model, args.adapter)
    prompt = format_prompt(args.prompt, args.input) if args.template == "alpaca" else args.prompt
    text = generate(model, tok, prompt, args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.seed)
    print(prompt + text)


def cmd_analyze_delta(args) -> None:
    from .analysis.report import analyze_models
    from .sketch.algorithm import check_bits_gpr

    gprs = tuple(int(g) for g in args.gpr.split(","))
    for g in gprs:
        check_bits_gpr(args.bits, g)
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


def cmd_eval_tasks(args) -> None:
    from .eval.tasks import run_eval_tasks

    run_eval_tasks(args)


COMMANDS = {
    "sketch": cmd_sketch, "ppl": cmd_ppl, "info": cmd_info, "train": cmd_train, "eval-tasks": cmd_eval_tasks,
    "analyze-delta": cmd_analyze_delta, "generate": cmd_generate,
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
    if args.command == "sketch":
        return "interrupted; nothing was written (any previous checkpoint at --out is unchanged)"
    return "interrupted"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads or free_cores())
        import sketchtune  # noqa: F401  (registers the quantizer)

        t0 = time.perf_counter()
        COMMANDS[args.command](args)
        if args.command == "sketch":
            print(f"\ndone in {time.perf_counter() - t0:.1f} s ({torch.get_num_threads()} threads)")
    except SketchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nerror: {interrupted_message(args)}", file=sys.stderr)  # own line, even after a progress bar
        return 130
    finally:
        torch.set_num_threads(threads_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
