"""Render the committed benchmark JSON as Markdown tables, and optionally write them into README.md.

The README's figures are generated from ``benchmarks/results/*.json`` by this script, never typed by hand:

    python benchmarks/tables.py                 # print
    python benchmarks/tables.py --update-readme # replace the block between the BENCHMARK-TABLE markers

Unfinished ``finetune_evidence_<task>.json`` runs are printed (marked PARTIAL) but kept out of the README unless
``--include-partial`` is given.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from sketchtune._io import write_text_atomic

RESULTS = Path(__file__).parent / "results"
START, END = "<!-- BENCHMARK-TABLE -->", "<!-- /BENCHMARK-TABLE -->"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def sketch_quality(d: dict) -> str:
    rows = d["rows"]
    fp = next(r for r in rows if r["method"] == "fp")
    main = [r for r in rows if r["method"] != "fp" and not (r["method"] == "sketch" and "/" in r["label"])
            and not r.get("healed") and not r.get("embeddings")]
    body = [[fp["label"], f"{fp['wikitext2_ppl']:.2f}", "", "", "", ""]]
    for r in sorted(main, key=lambda r: (-r["bits"], r["method"] != "sketch", r["gpr"], r["method"], r["refit"])):
        body.append([r["label"], f"{r['wikitext2_ppl']:.2f}", f"{r['sketched_over_fp16']:.3f}",
                     f"{r['checkpoint_weight_bytes'] / 2**20:.1f}", f"{r['sketch_seconds']:.0f}",
                     f"{r['peak_rss_over_model_bytes'] / 2**20:.0f}"])
    out = [f"**Sketch quality** — {d['meta']['model']}, calibration {d['meta']['calibration']}, {d['meta']['eval']}, "
           f"{d['meta']['device']} ({d['meta'].get('threads', '?')} threads). Sketch rows use importance diag(U)^-3; "
           "`k-means` is the default, `refit` adds `--refit`; bytes/fp16 = codes + codebooks of the sketched layers over their fp16 size; "
           "checkpoint MiB includes the unsketched embeddings.\n",
           _table(["configuration", "WikiText-2 ppl", "bytes / fp16", "checkpoint MiB", "sketch s", "peak MiB"], body)]
    sweep = {(r["importance"], r["s"]): r["wikitext2_ppl"] for r in rows
             if r["method"] == "sketch" and r["bits"] == 4 and r["gpr"] == 1 and not r["refit"] and "s" in r}
    if len(sweep) > 2:
        s_values = sorted({s for _, s in sweep})
        zero = sweep.get(("paper", 0.0))
        body = [[imp] + [f"{sweep.get((imp, s), zero if s == 0 else float('nan')):.2f}" for s in s_values]
                for imp in ("paper", "cholesky")]
        out += ["\n**Importance exponent** — INT4 GPR1, k-means codebooks (no refit), WikiText-2 ppl; "
                "`paper` = (1/[H⁻¹]ᵢᵢ)^s, `cholesky` = diag(U)^-s (s = 0 is the same unweighted k-means).\n",
                _table(["importance"] + [f"s={s:g}" for s in s_values], body)]
    tables = [r for r in rows if r.get("embeddings")]
    if tables:
        body = [[r["label"].replace(" + embeddings", "").replace(" + ", ", table ").replace(" embeddings", ""),
                 f"{r['dense_table_wikitext2_ppl']:.2f}",
                 f"{r['wikitext2_ppl']:.2f}", f"{r['wikitext2_ppl'] / r['dense_table_wikitext2_ppl']:.3f}×",
                 f"{r['embeddings_rel_error']:.2e}", f"{r['checkpoint_weight_bytes'] / 2**20:.1f}"]
                for r in sorted(tables, key=lambda r: (-r["bits"], r["gpr"]))]
        out += ["\n**Sketched embeddings** (`--sketch-embeddings`: the tied 49152 × 576 table / LM head sketched "
                "too, same bits and GPR unless the row names the table's). Each row's decoder sketch is "
                "scored twice: with the dense table put back, "
                "and with its sketched table; error = the head's relative output error on the calibration states.\n",
                _table(["configuration", "ppl, dense table", "ppl, sketched table", "ratio", "head error",
                        "checkpoint MiB"], body)]
    healed = [r for r in rows if r.get("healed")]
    if healed:
        out += ["\n" + healing(healed, fp["wikitext2_ppl"])]
    paper = {r["label"].replace(" s=3/paper", ""): r for r in rows if r["label"].endswith(" s=3/paper")}
    order = sorted(main, key=lambda r: (-r["bits"], r["gpr"], r["refit"]))
    pairs = [(r, paper[r["label"]]) for r in order if r["method"] == "sketch" and r["label"] in paper]
    if pairs:
        body = [[r["label"], f"{r['wikitext2_ppl']:.2f}", f"{p['wikitext2_ppl']:.2f}"] for r, p in pairs]
        out += ["\n**Default vs the paper's importance as written** (s = 3 both), WikiText-2 ppl.\n",
                _table(["configuration", "diag(U)^-3 (default)", "(1/[H⁻¹]ᵢᵢ)^3"], body)]
    return "\n".join(out)


def finetune(d: dict, task: str) -> str:
    rows = d["rows"]
    tasks = list(rows[0]["accuracy"])
    m = d["meta"]
    body = []
    for r in rows:
        before = f"{r['eval_loss_before']:.4f}" if "eval_loss_before" in r else "–"
        body.append([r["method"], f"{r['trainable_params']:,}", f"{r['base_model_bytes'] / 2**20:.1f}", before,
                     f"{r['eval_loss']:.4f}"] + [f"{r['accuracy'][t]:.2f}" for t in tasks]
                    + [f"{r['avg_accuracy']:.3f}", f"{r['seconds_per_step']:.2f}", f"{r['peak_rss_bytes'] / 2**20:.0f}"])
    return (f"**Fine-tuning, {task}** — SmolLM2-135M, {m['train_examples']} training examples, {m['max_steps']} steps × "
            f"batch {m['batch_size']}, held-out eval loss on {m['eval_examples']} examples, accuracy on the first "
            f"{m['eval_limit']} test records per task, {m.get('threads', '?')} CPU threads; loss@0 is the eval loss "
            "before training (what the base's compression costs).\n\n"
            + _table(["method", "trainable", "base MiB", "loss@0", "eval loss"] + tasks + ["avg acc", "s/step", "peak MiB"], body))


def _pm(mean_std: list[float], fmt: str) -> str:
    m, s = mean_std
    return f"{m:{fmt}} ± {s:{fmt}}" if s == s else f"{m:{fmt}}"  # s is NaN for one seed


def _ci(d: dict, fmt: str = "+.3f") -> str:
    lo, hi = d["ci95"]
    if lo != lo:  # NaN: one seed gives no interval
        return f"{d['mean']:{fmt}} [n/a]"
    return f"{d['mean']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def evidence_complete(d: dict) -> bool:
    budget = d["meta"].get("cpu_budget", {})
    return bool(budget) and budget.get("units_done") == budget.get("units_total")


def finetune_evidence(d: dict, task: str) -> str:
    """Issue #15's comparison (``finetune_evidence.py``): tuned LRs, seeds, larger test subsets, paired CIs."""
    m, a = d["meta"], d["analysis"]
    proto, budget, subsets = m["protocol"], m.get("cpu_budget", {}), m.get("eval_subsets", {})
    methods = [k for k, e in a["methods"].items() if "avg_accuracy_mean_std" in e]
    tasks = list(a["methods"][methods[0]]["accuracy_mean"]) if methods else []
    state = "complete" if evidence_complete(d) else f"PARTIAL: {budget.get('units_done')} of {budget.get('units_total')} units"
    n_rec = proto["eval_per_task"] or "all"
    tb = m.get("token_budget", {})
    out = [f"**Fine-tuning evidence, {task}** ({state}) — SmolLM2-135M, {tb.get('steps')} steps × batch {tb.get('batch')} "
           f"× cutoff {tb.get('cutoff_len')} for every method; LR per method picked from a 3-point grid by validation "
           f"loss ({proto['val_examples']} examples carved from the training data, runs of "
           f"{max(1, round(proto['max_steps'] * proto['lr_fraction']))} steps); seeds {', '.join(map(str, proto['seeds']))}; accuracy on a fixed random {n_rec} test records "
           f"per set ({subsets.get('scoring', '?')} scoring); mean ± std over seeds; {m.get('threads', '?')} CPU thread(s).\n"]
    body = []
    for name in methods:
        e = a["methods"][name]
        edge = " (edge)" if e.get("chosen_lr_on_grid_edge") else ""
        body.append([name, f"{e['trainable_params']:,}", f"{e['base_model_bytes'] / 2**20:.1f}", f"{e['chosen_lr']:g}{edge}",
                     str(len(e["seeds"])), _pm(e["val_loss_mean_std"], ".4f")]
                    + [f"{e['accuracy_mean'][t]:.3f}" for t in tasks]
                    + [_pm(e["avg_accuracy_mean_std"], ".3f"), str(e["plateau_step"]), f"{e['seconds_per_step_mean']:.2f}",
                       f"{e['peak_rss_bytes_max'] / 2**20:.0f}"])
    if body:
        out.append(_table(["method", "trainable", "base MiB", "LR", "seeds", "val loss"] + tasks
                          + ["avg acc", "plateau step", "s/step", "peak MiB"], body))
    grid_rows = lr_grid_rows(d)
    if grid_rows:
        out += ["\n**LR grid** (validation loss after each short run; the pick in bold, — not run yet).\n",
                _table(["method", "validation loss at each learning rate", "picked"], grid_rows)]
    if a.get("bases"):
        rows = [[b, f"{e['base_model_bytes'] / 2**20:.1f}", f"{e['val_loss']:.4f}"]
                + [f"{e['accuracy'][t]:.3f}" for t in (tasks or list(e["accuracy"]))] + [f"{e['avg_accuracy']:.3f}"]
                for b, e in a["bases"].items()]
        first = next(iter(a["bases"].values()))
        out += ["\n**Before training** (answer bias of each base on the same test records; val loss at step 0).\n",
                _table(["base", "base MiB", "val loss"] + (tasks or list(first["accuracy"])) + ["avg acc"], rows)]
    if a.get("paired_vs_sketchtune"):
        rows = []
        for pair, p in a["paired_vs_sketchtune"].items():
            rows.append([pair, str(len(p["seeds"])), _ci(p["avg_accuracy_diff_t"]),
                         _ci(p["avg_accuracy_diff_bootstrap_records"]), _ci(p["val_loss_diff_t"], "+.4f"),
                         f"{p['base_bytes_ratio_other_over_sketchtune']:.2f}×"])
        out += ["\n**SketchTune minus baseline**, paired by seed: mean [95% interval]; `t` over seeds, `records` a "
                "bootstrap over test records (stratified by set, seed-averaged); base ratio = baseline base bytes / "
                "SketchTune base bytes.\n",
                _table(["pair", "seeds", "avg acc (t)", "avg acc (records)", "val loss (t)", "base ratio"], rows)]
    if budget and not budget.get("measured_s_per_step"):  # no training unit yet: nothing to project from
        out.append(f"\nNo training unit finished yet; {len(budget.get('units_not_yet_projectable', []))} units "
                   "are not yet projectable.")
    elif budget:
        sps = ", ".join(f"{k} {v:.2f}" for k, v in budget.get("measured_s_per_step", {}).items())
        out.append(f"\nMeasured s/step: {sps}. Projected CPU hours for the whole protocol: "
                   f"{budget.get('projected_cpu_hours_total', float('nan')):.1f} "
                   f"({budget.get('projected_cpu_hours_remaining', float('nan')):.1f} remaining"
                   + (f", {len(budget['units_not_yet_projectable'])} units not yet projectable"
                      if budget.get("units_not_yet_projectable") else "") + ").")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out))  # one blank line where a table is left out


def lr_grid_rows(d: dict) -> list[list[str]]:
    """Per method with at least one finished LR point: each grid point's validation loss (the analysis's
    ``lr_grid_val_loss``, keyed by ``f"{lr:g}"``) in the grid's order, and the pick."""
    rows = []
    for method, e in d["analysis"]["methods"].items():
        done = {lr: v for lr, v in e.get("lr_grid_val_loss", {}).items() if v is not None}
        if not done:
            continue
        picked, cells = e.get("chosen_lr"), []
        for lr in d["meta"]["lr_grids"][method]:
            cell = f"{lr:g}: " + (f"{done[f'{lr:g}']:.4f}" if f"{lr:g}" in done else "—")
            cells.append(f"**{cell}**" if lr == picked else cell)
        rows.append([method, " · ".join(cells), f"{picked:g}" if picked else "—"])
    return rows


def healing(rows: list[dict], fp_ppl: float) -> str:
    body = []
    for r in sorted(rows, key=lambda r: (-r["bits"], r["gpr"])):
        b, h = r["before"], r["healing"]
        curve = ", ".join(f"{p['step']}: {p['wikitext2_ppl']:.1f}/{p['heldout_c4_ppl']:.1f}" for p in r["curve"])
        name = r["label"].replace(" healed", "").removesuffix(f", {h['steps']} steps")  # steps: own column
        body.append([name, f"{b['wikitext2_ppl']:.2f} → {r['wikitext2_ppl']:.2f}",
                     f"{b['heldout_c4_ppl']:.2f} → {r['heldout_c4_ppl']:.2f}",
                     f"{h['kl_before']:.3f} → {h['kl_after']:.3f}", f"{h['steps']}", f"{h['tokens']:,}",
                     f"{h['seconds'] / 60:.0f} min ({h['seconds_per_step']:.1f} s/step, {h['threads']} thr"
                     + (f", peak {h['peak_rss_bytes'] / 2**30:.1f} GiB)" if "peak_rss_bytes" in h else ")"), curve])
    split = rows[0]["split"]
    return (f"**Healing** (`sketchtune heal`, KL(teacher‖student) at T = 1, codebooks only; FP WikiText-2 ppl "
            f"{fp_ppl:.2f}) — healed on C4 windows from the first {split['heal_docs']} documents; held-out C4 = "
            f"{split['heldout_docs']} of the last documents that no sketching or healing window touched. Curve: "
            "step: WikiText-2 / held-out C4 ppl, scored in fp32 during healing (the before/after columns are the "
            "fp16 checkpoints reloaded).\n\n"
            + _table(["configuration", "WikiText-2 ppl", "held-out C4 ppl", "KL to teacher", "steps", "tokens",
                      "healing time", "curve"], body))


def generate_cpu(d: dict, name: str = "generate_cpu.json") -> str:
    body = [[r["variant"], f"{r['tokens_per_s']:.1f}", f"{r.get('speed_vs_dense-fp32', float('nan')):.2f}×",
             f"{r.get('speed_vs_dense-bf16', float('nan')):.2f}×", f"{r['weight_bytes'] / 2**20:.1f}",
             f"{r['rss_loaded_mb']:.0f}", f"{r['peak_rss_generating_mb']:.0f}"] for r in d["rows"]]
    return (f"**Generation on CPU** (`{name}`) — {d['model']}, {d['new_tokens']} greedy tokens, "
            f"{d['machine']['threads']} thread, fresh process per variant, median of {d['rounds']} rounds; RSS in MiB "
            "above the interpreter; `sketch` is INT4 GPR 1 on the C++ kernels, `sketch+cache` the same with the "
            "opt-in dense-Ŵ cache, `sketch-emb` the same decoder sketch with its embedding table / LM head sketched "
            "too (`--sketch-embeddings`), `sketch-bf16` the sketch loaded in bf16, `llama.cpp` the GGUF file (Q4_1) "
            "through llama-cpp-python. "
            f"CPU: {d['machine'].get('cpu_model', _EARLIER_CPU)}.\n\n"
            + _table(["variant", "tokens/s", "vs fp32", "vs bf16", "weights MiB", "RSS loaded", "peak RSS generating"],
                     body))


# results written before machine_meta recorded the CPU came from the AMD EPYC (Zen 4) machines
_EARLIER_CPU = "AMD EPYC (Zen 4, AVX512-BF16, no AMX)"


def cpu_gemv(d: dict, name: str = "cpu_gemv.json") -> str:
    rows = d["rows"]
    cpu = d["machine"].get("cpu_model", _EARLIER_CPU)
    configs = [(4, 1), (4, 4), (3, 1), (2, 1)]
    header = ["threads", "out×in"] + [f"INT{b} GPR{g}" for b, g in configs]

    def ratio(r: dict, kernel: str, base: str) -> float:
        """Against NF4 the median of the per-round ratios where the run kept them (robust to bandwidth drift)."""
        paired = r.get(f"{kernel}_vs_{base}_paired")
        return paired["median"] if paired else r[f"{kernel}_vs_{base}"]

    def grid(kernel: str, bases: tuple[str, ...]) -> str:
        """One row per (threads, shape), one cell per config: the kernel's speed-ups over ``bases``."""
        body = []
        for threads in sorted({r["threads"] for r in rows}):
            for out, inp in dict.fromkeys((r["out"], r["in"]) for r in rows):
                cells = []
                for bits, gpr in configs:
                    r = next((r for r in rows if (r["threads"], r["out"], r["in"], r["bits"], r["gpr"])
                              == (threads, out, inp, bits, gpr)), None)
                    cells.append("—" if r is None or f"{kernel}_ms" not in r else " / ".join(
                        f"{ratio(r, kernel, b):.2f}×" if f"{kernel}_vs_{b}" in r else "—" for b in bases))
                body.append([str(threads), f"{out}×{inp}"] + cells)
        return _table(header, body)

    text = (f"**CPU decode GEMV** (`{name}`, {cpu}, one token, AVX-512, medians of round-robin calls) — speed-up "
            "of the sketch kernel over dense fp32 / dense bf16 `F.linear` / bitsandbytes NF4 `Linear4bit` (> 1: the "
            "sketch is faster; against NF4 the median of the per-round ratios where the JSON has them, with their "
            f"95% intervals there). AVX2 rows and bytes are in the JSON; `{name[:-5]}.png` plots the times.\n\n"
            + grid("avx512", ("dense_fp32", "dense_bf16", "nf4")))
    if any("bf16_gemv_ms" in r for r in rows):
        text += ("\n\nThe same with bf16 activations on the bf16 GEMV (`bf16_gemv.cpp`: bf16 Ŵ × bf16 x, fp32 "
                 "accumulation — the arithmetic bitsandbytes' NF4 CPU kernel does) — speed-up over dense bf16 "
                 "`F.linear` / bitsandbytes NF4 (— where the groups are not a multiple of 16 columns: those layers "
                 "keep the fp32 GEMV).\n\n"
                 + grid("bf16_gemv", ("dense_bf16", "nf4")))
    return text


def cpu_batched(d: dict, name: str = "cpu_batched.json") -> str:
    rows = d["rows"]
    cpu = d["machine"].get("cpu_model", _EARLIER_CPU)
    tokens = sorted({r["tokens"] for r in rows})
    body = []
    for threads in sorted({r["threads"] for r in rows}):
        for out, inp, bits, gpr in dict.fromkeys((r["out"], r["in"], r["bits"], r["gpr"]) for r in rows):
            cells = []
            for t in tokens:
                r = next((r for r in rows if (r["threads"], r["out"], r["in"], r["bits"], r["gpr"], r["tokens"])
                          == (threads, out, inp, bits, gpr, t)), None)
                cells.append("—" if r is None else f"{r['time_vs_dense_bf16']:.2f}× {r['kernel']}")
            body.append([str(threads), f"{out}×{inp}", f"INT{bits} GPR{gpr}"] + cells)
    return (f"**CPU, several tokens at once** (`{name}`, {cpu}, bf16, medians of round-robin calls) — time of "
            "the sketch layer's inference path over dense bf16 `F.linear`'s (< 1: the sketch is faster), and the "
            "kernel that ran.\n\n"
            + _table(["threads", "out×in", "sketch"] + [f"{t} tok" for t in tokens], body))


def efficiency(d: dict, name: str = "efficiency_cpu.json") -> str:
    meta, model = d["meta"], d["model"]
    shape = meta["model"]
    keys = [("decode_b1_ms_per_step", "decode b1 ms"), ("decode_b8_ms_per_step", "decode b8 ms"),
            ("ttft_512_ms", "TTFT 512 ms"), ("ttft_1024_ms", "TTFT 1024 ms"), ("train_step_s", "train step s"),
            ("train_peak_above_imports_mb", "train peak MiB")]
    body = []
    for variant, r in model.items():
        lora = model.get("lora", r)
        body.append([variant, f"{r['weight_bytes'] / 2**20:.1f}"]
                    + [f"{r[k]:.1f} ({r[k] / lora[k]:.2f}×)" if k in r else "—" for k, _ in keys])
        if "decode_b1_ms_per_step_cache" in r:  # the opt-in dense-Ŵ cache instead of the C++ kernels
            body.append([f"{variant} + dense-Ŵ cache", f"{(r['weight_bytes'] + r['decode_cache_bytes_opt_in']) / 2**20:.1f}"]
                        + [f"{r[k + '_cache']:.1f} ({r[k + '_cache'] / lora[k]:.2f}×)" if k + "_cache" in r else "—"
                           for k, _ in keys])
    floor = model["dense"].get("train_step_s_grad_floor")
    if floor is not None:  # dense forward + backward computing ∂L/∂W of the decoder projections, no optimizer
        lora = model["lora"]["train_step_s"]
        body.append(["floor: dense, decoder ∂L/∂W only", "—", "—", "—", "—", "—", f"{floor:.1f} ({floor / lora:.2f}×)",
                     "—"])
    for variant, r in model.items():
        if "train_step_s_bf16_codebook_grad" in r:  # SKETCHTUNE_CODEBOOK_GRAD=bf16
            t = r["train_step_s_bf16_codebook_grad"]
            body.append([f"{variant}, dYᵀX in bf16", "—", "—", "—", "—", "—",
                         f"{t:.1f} ({t / model['lora']['train_step_s']:.2f}×)", "—"])
    cpu = meta.get("cpu_model", _EARLIER_CPU)
    return (f"**Efficiency (CPU)** (`{name}`, {cpu}) — {shape['layers']} Llama layers, hidden {shape['hidden']}, "
            f"MLP {shape['mlp']}, {meta['threads']} thread(s), training steps on 1 × {meta.get('train_seq', 256)} tokens, medians; "
            "in parentheses the ratio to LoRA. Sketch rows run the C++ "
            "kernels (the CPU default); `+ dense-Ŵ cache` rows decode through the opt-in cache "
            "(`SKETCHTUNE_KERNELS=cache`), whose dense Ŵ counts in their weights.\n\n"
            + _table(["method", "weights MiB"] + [label for _, label in keys], body))


def render(include_partial: bool = True) -> str:
    parts = []
    if (d := _load("sketch_quality.json")) is not None:
        parts.append(sketch_quality(d))
    for task in ("math", "commonsense"):
        if (d := _load(f"finetune_{task}.json")) is not None and d["rows"]:
            parts.append(finetune(d, task))
    if (d := _load("finetune_commonsense_healed.json")) is not None and d["rows"]:
        parts.append(finetune(d, "commonsense, healed vs unhealed INT4 GPR 4 base (issue #13)"))
    for task in ("commonsense", "math"):
        d = _load(f"finetune_evidence_{task}.json")
        if d is not None and d.get("units") and (include_partial or evidence_complete(d)):
            parts.append(finetune_evidence(d, task))
    for name in ("efficiency_cpu.json", "efficiency_cpu_seq1024.json", "efficiency_cpu_xeon.json"):
        if (d := _load(name)) is not None:
            parts.append(efficiency(d, name))
    for name in ("generate_cpu.json", "generate_cpu_quiet.json", "generate_cpu_xeon.json"):
        if (d := _load(name)) is not None:
            parts.append(generate_cpu(d, name))
    for name in ("cpu_gemv.json", "cpu_gemv_xeon.json"):
        if (d := _load(name)) is not None and "rows" in d and "dense_bf16_ms" in d["rows"][0]:
            parts.append(cpu_gemv(d, name))
    for name in ("cpu_batched.json", "cpu_batched_amx.json"):
        if (d := _load(name)) is not None:
            parts.append(cpu_batched(d, name))
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--update-readme", action="store_true")
    p.add_argument("--include-partial", action="store_true",
                   help="with --update-readme, also write finetune_evidence tables whose run is unfinished")
    args = p.parse_args()
    text = render(include_partial=args.include_partial or not args.update_readme)
    if not args.update_readme:
        print(text)
        return
    readme = Path(__file__).parent.parent / "README.md"
    src = readme.read_text()
    head, _, rest = src.partition(START)
    _, _, tail = rest.partition(END)
    write_text_atomic(readme, f"{head}{START}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
