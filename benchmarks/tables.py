"""Render the committed benchmark JSON as Markdown tables, and optionally write them into README.md.

The README's figures are generated from ``benchmarks/results/*.json`` by this script, never typed by hand:

    python benchmarks/tables.py                 # print
    python benchmarks/tables.py --update-readme # replace the block between the BENCHMARK-TABLE markers
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    main = [r for r in rows if r["method"] != "fp" and not (r["method"] == "sketch" and "/" in r["label"])]
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


def efficiency(d: dict) -> str:
    meta, model = d["meta"], d["model"]
    shape = meta["model"]
    keys = [("decode_b1_ms_per_step", "decode b1 ms"), ("decode_b8_ms_per_step", "decode b8 ms"),
            ("ttft_512_ms", "TTFT 512 ms"), ("ttft_1024_ms", "TTFT 1024 ms"), ("train_step_s", "train step s"),
            ("train_peak_above_imports_mb", "train peak MiB")]
    body = []
    for name, r in model.items():
        lora = model.get("lora", r)
        body.append([name, f"{r['weight_bytes'] / 2**20:.1f}"]
                    + [f"{r[k]:.1f} ({r[k] / lora[k]:.2f}×)" for k, _ in keys])
    return (f"**Efficiency (CPU)** — {shape['layers']} Llama layers, hidden {shape['hidden']}, MLP {shape['mlp']}, "
            f"{meta['threads']} thread(s), medians; in parentheses the ratio to LoRA.\n\n"
            + _table(["method", "weights MiB"] + [label for _, label in keys], body))


def render() -> str:
    parts = []
    if (d := _load("sketch_quality.json")) is not None:
        parts.append(sketch_quality(d))
    for task in ("math", "commonsense"):
        if (d := _load(f"finetune_{task}.json")) is not None and d["rows"]:
            parts.append(finetune(d, task))
    if (d := _load("efficiency_cpu.json")) is not None:
        parts.append(efficiency(d))
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args()
    text = render()
    if not args.update_readme:
        print(text)
        return
    readme = Path(__file__).parent.parent / "README.md"
    src = readme.read_text()
    head, _, rest = src.partition(START)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
