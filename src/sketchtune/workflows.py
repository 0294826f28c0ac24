"""The jobs the CLI runs, as library functions returning dataclasses: a Python user runs the same main job.

``sketch_job`` is the whole main job (perplexity before, sketch, save, reload, perplexity after, describe,
sample); ``train_job`` tokenizes data and fine-tunes codebooks with every check done before work starts;
``eval_tasks_job`` scores downstream tasks. The CLI only parses arguments and prints what these return.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ._io import write_json_atomic
from .bundled import BUNDLED_MODEL
from .checkpoint import check_output_dir, load, save
from .errors import SketchError
from .eval.generate import generate
from .eval.perplexity import perplexity
from .eval.tasks import (
    TASKS,
    evaluate_tasks,
    resolve_tasks,
    resolve_tasks_dir,
    task_file,
)
from .info import describe
from .layout import check_layout
from .modeling import load_for_eval, load_model, resolve_device
from .prompts import DEFAULT_PROMPT, format_prompt
from .sketch.calibration import calibration_tokens
from .sketch.pipeline import DEFAULT_IMPORTANCE, DEFAULT_S, TABLE_MIN_BITS, SketchReport, sketch_model
from .sketch.streaming import StreamedModel, write_streamed_checkpoint
from .train import HEAL_LEARNING_RATE

Notify = Callable[[str], None]


def partial_dir(out: str | os.PathLike, kind: str = "partial") -> Path:
    """Where a job writing ``out`` keeps its unfinished work (a sketch's finished layers: ``partial``; a heal's
    Trainer checkpoints: ``healing``) until the checkpoint is written."""
    out = Path(out)
    return out.with_name(f".{out.name}.{kind}")


def _claim_partial(partial: Path, out: Path, noun: str, resume: bool, restart: bool, resumable: bool) -> None:
    """What a killed run left at ``partial``: continued with ``resume`` (refused when there is nothing
    ``resumable``), discarded with ``restart``, refused otherwise — so nothing is lost or silently reused."""
    if partial.exists() and not resume:
        if not restart:
            raise SketchError(f"a partial {noun} for {out} is at {partial}: pass --resume to continue it, "
                              "or --overwrite to start over")
        shutil.rmtree(partial)
    if resume and not resumable:
        raise SketchError(f"--resume: no partial {noun} for {out} (expected {partial})")


@dataclass
class SketchJob:
    """What the main job did: where from and to, the sketch report, perplexity before/after, sizes, a sample."""

    source: str
    out: Path
    report: SketchReport
    eval_seqlen: int
    perplexity: dict[str, tuple[float, float]]  # text -> (before, after)
    info: dict
    prompt: str
    sample: str | None  # None when streamed: the sketched model is not loaded whole just to sample from it
    healing: "HealJob | None" = None


def sketch_job(
    model: str | None = None, out: str | os.PathLike | None = None, *, overwrite: bool = False, bits: int = 4,
    gpr: int = 1, calib: str = "c4", nsamples: int = 128, seqlen: int = 2048, method: str = "sketch",
    s: float | None = None, importance: str | None = None, refit: bool = False, percdamp: float = 0.01,
    dtype: str = "float16", device: str | None = None, seed: int = 0, resume: bool = False,
    eval_data: tuple[str, ...] = ("wikitext2", "tinystories"), eval_seqlen: int = 256, eval_windows: int = 40,
    prompt: str = DEFAULT_PROMPT, sample_tokens: int = 48, progress: bool = True, stream: bool = False,
    heal_steps: int = 0, embeddings: bool = False, embedding_bits: int | None = None,
    embedding_gpr: int | None = None,
) -> SketchJob:
    """Sketch ``model`` (default: the bundled TinyStories-656K) into ``out`` and measure what it cost.

    Finished layers are kept in ``.<out>.partial`` beside ``out`` until the checkpoint is saved, so a killed run
    continues with ``resume=True`` (``--resume``) after its last finished layer. ``stream=True`` never holds the
    whole model: one decoder layer is read from the safetensors shards at a time and the checkpoint is written
    layer by layer (:mod:`sketchtune.sketch.streaming`); perplexity and the sample are then skipped, as they would
    need the whole model (run ``sketchtune ppl OUT`` on a machine that holds it). ``heal_steps`` > 0 heals
    the saved sketch towards ``model`` on the calibration text (:func:`heal_job`, its defaults otherwise)
    before it is measured. ``embeddings=True`` sketches the token embedding and LM head too
    (with ``embedding_bits`` / ``embedding_gpr``; see :func:`sketch_model` for their defaults).
    """
    check_layout(bits, gpr)  # before loading anything; divisibility is checked per layer
    if embeddings:
        try:
            check_layout(embedding_bits or max(bits, TABLE_MIN_BITS), embedding_gpr or gpr)
        except SketchError as e:
            raise SketchError(f"embeddings: {e}") from None
    if stream and heal_steps:
        raise SketchError("--heal-steps needs the whole model (teacher and student); it cannot follow --stream: "
                          "run `sketchtune heal OUT --overwrite` where the model fits")
    if stream and embeddings:
        raise SketchError("--sketch-embeddings cannot be combined with --stream yet (sketch without --stream)")
    spec = model or str(BUNDLED_MODEL)
    name = Path(spec).stem if model else "tinystories-656k"
    out_dir = Path(out or f"sketched-{name}-int{bits}-gpr{gpr}")
    check_output_dir(out_dir, overwrite)  # refuse before an expensive sketch, not after it
    partial = partial_dir(out_dir)
    _claim_partial(partial, out_dir, "sketch", resume, restart=overwrite,
                   resumable=(partial / "progress.json").is_file())
    dev = resolve_device(device)
    settings = dict(calib=calib, nsamples=nsamples, seqlen=seqlen, bits=bits, gpr=gpr,
                    s=DEFAULT_S if s is None else s, importance=importance or DEFAULT_IMPORTANCE, refit=refit,
                    percdamp=percdamp, method=method, seed=seed, device=dev, progress=progress, progress_dir=partial,
                    resume=resume, embeddings=embeddings, embedding_bits=embedding_bits, embedding_gpr=embedding_gpr)
    if stream:
        from transformers import AutoTokenizer

        streamed = StreamedModel(spec, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(spec)
        report = sketch_model(streamed.model, tok, stream=streamed, **settings)
        streamed.model.config.quantization_config.source_model = spec
        write_streamed_checkpoint(streamed, partial, tok, out_dir, dtype=dtype, overwrite=overwrite)
        shutil.rmtree(partial, ignore_errors=True)
        return SketchJob(source=spec, out=out_dir, report=report, eval_seqlen=eval_seqlen, perplexity={},
                         info=describe(out_dir), prompt=prompt, sample=None)
    base, tok = load_model(spec, dtype=torch.float32, device=dev)
    evals = [e for e in eval_data if e]

    def ppl_row(m) -> tuple[list[float], int]:
        results = [perplexity(m, tok, e, eval_seqlen, eval_windows, progress=False) for e in evals]
        return [r.ppl for r in results], (results[0].seqlen if results else eval_seqlen)

    before, used_seqlen = ppl_row(base)
    base.to("cpu")
    report = sketch_model(base, tok, **settings)
    base.config.quantization_config.source_model = spec
    save(base, tok, out_dir, dtype=dtype, overwrite=overwrite)
    shutil.rmtree(partial, ignore_errors=True)  # the checkpoint is complete: the per-layer copies are redundant
    healing = None
    if heal_steps:
        del base
        healing = heal_job(out_dir, spec, out_dir, calib=calib, overwrite=True, dtype=dtype, device=dev,
                 max_steps=heal_steps, disable_tqdm=not progress)
    sketched, _ = load(out_dir, dtype=torch.float32, device=dev)
    after, _ = ppl_row(sketched)
    return SketchJob(
        source=spec, out=out_dir, report=report, eval_seqlen=used_seqlen,
        perplexity={e: (b, a) for e, b, a in zip(evals, before, after)}, info=describe(out_dir), prompt=prompt,
        sample=generate(sketched, tok, prompt, max_new_tokens=sample_tokens), healing=healing,
    )


@dataclass
class TrainJob:
    out: Path
    metrics: dict
    resumed_from: str | None
    adapter: Path = field(init=False)

    def __post_init__(self) -> None:
        self.adapter = self.out / "sketch_adapter.safetensors"


def train_job(
    model: str, data: str, out: str | os.PathLike, *, eval_data: str | None = None, val_set_size: int = 0,
    cutoff_len: int = 256, train_on_inputs: bool = False, resume: bool = False, overwrite: bool = False,
    save_full: bool = False, fsdp: bool = False, device: str | None = None, notify: Notify | None = None,
    **training_args: Any,
) -> TrainJob:
    """Fine-tune the codebooks of the sketched checkpoint ``model`` on ``data`` into the run directory ``out``.

    Every refusal (contradictory flags, a stale run directory, a resume against another base, bad data)
    happens before training starts; ``notify`` hears which checkpoint a resumed run continues from.
    """
    # The training stack (Trainer, datasets, and what they pull in: ~250 MB resident) is imported only by
    # the jobs that train, so `sketch` — perhaps of a model that barely fits — does not carry it.
    from .train.data import build_dataset
    from .train.trainer import (
        check_fsdp_request,
        prepare_run_dir,
        resume_checkpoint,
        train_sketch,
    )

    if resume and overwrite:
        raise SketchError("--resume and --overwrite contradict each other: continue the run, or start over")
    if training_args.get("bf16") and training_args.get("fp16"):
        raise SketchError("--bf16 and --fp16 exclude each other: pick one autocast precision")
    if fsdp:
        check_fsdp_request(resume=resume, save_full=save_full)
    dev = resolve_device(device)
    sketched, tok = load(model, dtype="auto", device=dev)  # fp16 checkpoints run in fp32 on CPU (run_dtype)
    if tok is None:
        raise SketchError(f"{model} has no tokenizer files")
    if resume:
        ckpt: str | bool = resume_checkpoint(out, sketched)
        if notify:
            notify(f"resuming from {ckpt} (step {Path(ckpt).name.split('-')[-1]})")
    else:
        ckpt = False
        prepare_run_dir(out, overwrite)
    train_ds = build_dataset(data, tok, cutoff_len, train_on_inputs)
    eval_ds = build_dataset(eval_data, tok, cutoff_len, train_on_inputs) if eval_data else None
    if eval_ds is None and val_set_size > 0:
        if val_set_size >= len(train_ds):
            raise SketchError(f"--val-set-size {val_set_size} leaves no training examples of {len(train_ds)}")
        split = train_ds.train_test_split(test_size=val_set_size, seed=training_args.get("seed", 42))
        train_ds, eval_ds = split["train"], split["test"]
    metrics = train_sketch(sketched, tok, train_ds, out, eval_ds, resume=ckpt, save_full=save_full, fsdp=fsdp,
                           overwrite=overwrite, use_cpu=dev == "cpu", **training_args)
    return TrainJob(out=Path(out), metrics=metrics, resumed_from=metrics["resumed_from"])


@dataclass
class HealJob:
    """What healing did: where to, the KL to the teacher before and after on held-out windows, the run's metrics."""

    out: Path
    kl_before: float
    kl_after: float
    eval_tokens: int
    train_tokens: int
    metrics: dict
    resumed_from: str | None


def heal_job(
    model: str | os.PathLike, teacher: str | None, out: str | os.PathLike, *, calib: str = "c4",
    nsamples: int = 128, seqlen: int = 512, seed: int = 1, eval_data: str | None = None, eval_windows: int = 8,
    temperature: float = 1.0, direction: str = "forward", resume: bool = False, overwrite: bool = False,
    dtype: str = "float16", device: str | None = None, notify: Notify | None = None, **training_args: Any,
) -> HealJob:
    """Distil the sketched checkpoint ``model``'s codebooks towards ``teacher`` on calibration text into ``out``.

    ``teacher`` defaults to the model the sketch was made from (``quantization_config.source_model``). The
    KL before/after is measured on ``eval_windows`` windows of ``eval_data`` (default: other windows of the
    calibration text, seed + 1000). Trainer checkpoints live in ``.<out>.healing`` until the healed checkpoint
    is written, so a killed run continues with ``resume=True``. ``out`` may be ``model`` itself with
    ``overwrite=True`` (replaced atomically once healing is done).
    """
    from .train.heal import (
        DistillationTrainer,
        check_teacher,
        mean_kl,
        window_collator,
        window_dataset,
    )
    from .train.trainer import resume_checkpoint, train_sketch

    if training_args.get("learning_rate") is None:  # `sketch --heal-steps` heals as `heal` does
        training_args["learning_rate"] = HEAL_LEARNING_RATE
    out = Path(out)
    in_place = out.resolve() == Path(model).resolve()
    if resume and overwrite and not in_place:
        raise SketchError("--resume and --overwrite contradict each other: continue the run, or start over")
    if in_place and not overwrite:
        raise SketchError(f"{out} already holds a sketched checkpoint (the one to heal): pass --overwrite to "
                          "replace it with the healed one")
    if not in_place:
        check_output_dir(out, overwrite)
    run = partial_dir(out, "healing")
    # In place, --overwrite is what replaces the checkpoint being healed, not permission to discard a partial heal.
    _claim_partial(run, out, "heal", resume, restart=overwrite and not in_place, resumable=run.is_dir())
    dev = resolve_device(device)
    student, tok = load(model, dtype=torch.float32, device=dev)
    if tok is None:
        raise SketchError(f"{model} has no tokenizer files")
    qc = student.config.quantization_config
    teacher = teacher or qc.source_model
    if not teacher:
        raise SketchError(f"{model} does not record the model it was sketched from: pass --teacher")
    teacher_model, _ = load_model(teacher, dtype=torch.float32, device=dev)
    check_teacher(student, teacher_model)
    context = getattr(student.config, "max_position_embeddings", None) or seqlen
    seqlen = min(seqlen, context)
    train_tokens = calibration_tokens(tok, calib, nsamples, seqlen, seed)
    eval_tokens = calibration_tokens(tok, eval_data or calib, eval_windows, seqlen, seed + 1000)
    kl_before = mean_kl(student, teacher_model, eval_tokens, temperature=temperature, direction=direction)
    ckpt: str | bool = False
    if resume:
        ckpt = resume_checkpoint(run, student)
        if notify:
            notify(f"resuming from {ckpt} (step {Path(ckpt).name.split('-')[-1]})")
    metrics = train_sketch(
        student, tok, window_dataset(train_tokens), run, resume=ckpt, use_cpu=dev == "cpu",
        trainer_class=DistillationTrainer, collator=window_collator,
        trainer_kwargs={"teacher": teacher_model, "temperature": temperature, "direction": direction},
        **training_args,
    )
    student.eval()
    kl_after = mean_kl(student, teacher_model, eval_tokens, temperature=temperature, direction=direction)
    qc.healing = {"teacher": str(teacher), "calibration": {"source": str(calib), "nsamples": nsamples,
                  "seqlen": seqlen, "seed": seed}, "steps": metrics["global_step"],
                  "tokens": metrics["global_step"] * metrics["examples_per_step"] * seqlen,
                  "learning_rate": training_args["learning_rate"], "temperature": temperature,
                  "direction": direction, "kl_before": kl_before, "kl_after": kl_after}
    save(student, tok, out, dtype=dtype, overwrite=overwrite)
    shutil.rmtree(run, ignore_errors=True)
    return HealJob(out=out, kl_before=kl_before, kl_after=kl_after, eval_tokens=eval_tokens.numel(),
                   train_tokens=train_tokens.numel(), metrics=metrics, resumed_from=metrics["resumed_from"])


def eval_tasks_job(
    model: str, tasks: str, data_dir: str | None = None, *, adapter: str | None = None, limit: int | None = None,
    batch_size: int = 8, mode: str = "generate", max_new_tokens: int | None = None, out: str | None = None,
    device: str | None = None, notify: Notify | None = None, progress: bool = True,
) -> dict:
    """Accuracy on LLM-Adapters tasks; every task file is checked before a model is loaded."""
    for flag, value in (("limit", limit), ("batch-size", batch_size), ("max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise SketchError(f"--{flag} must be ≥ 1, got {value}")
    names = resolve_tasks(tasks)
    generated = [n for n in names if TASKS[n].family != "commonsense"]
    if mode == "likelihood" and generated and notify:
        notify(f"note: likelihood scoring covers the commonsense sets only; falling back to generation for "
               f"{', '.join(generated)}")
    root = resolve_tasks_dir(data_dir)
    for name in names:
        task_file(name, root)
    lm, tokenizer = load_for_eval(model, adapter, resolve_device(device))
    results = evaluate_tasks(lm, tokenizer, names, root, limit=limit, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, mode=mode, progress=progress)
    results["model"] = model
    if adapter:
        results["adapter"] = adapter
    if out:
        write_json_atomic(out, results)
    return results


def apply_adapter_job(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
                      dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write ``base`` with ``adapter``'s codebooks as an ordinary sketched checkpoint at ``out``.

    An adapter is only codebooks over a base's shared codes; tools that load one checkpoint (vLLM,
    ``from_pretrained``) need them merged. The adapter is checked against the base's codes first (it refuses a
    different base), ``out`` is checked before anything is loaded, and the write is atomic."""
    from .train.adapter import load_adapter

    check_output_dir(out, overwrite)
    model, tok = load(base, dtype=dtype or "auto")  # in the output dtype: codebooks are rounded once, on copy
    load_adapter(model, adapter)
    return save(model, tok, out, dtype=dtype, overwrite=overwrite)


def generate_job(
    model: str, prompt: str = DEFAULT_PROMPT, *, adapter: str | None = None, template: str = "none",
    input: str = "", max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,  # noqa: A002
    top_p: float = 1.0, seed: int = 0, device: str | None = None,
) -> tuple[str, str]:
    """``(prompt as the model saw it, continuation)``; ``template="alpaca"`` asks as ``train`` trained it."""
    if template not in ("none", "alpaca"):
        raise SketchError(f"template must be 'none' or 'alpaca', got {template!r}")
    if input and template == "none":
        raise SketchError("--input is the record's input field: use it with --template alpaca")
    lm, tok = load_for_eval(model, adapter, resolve_device(device))
    text = format_prompt(prompt, input) if template == "alpaca" else prompt
    return text, generate(lm, tok, text, max_new_tokens, do_sample, temperature, top_p, seed)
