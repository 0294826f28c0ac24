"""Does the test suite notice when the math is wrong? Apply known-bad mutations to a copy of ``src/`` and run it.

Each mutation below is a plausible bug that once passed every test (issue "Tests that protect the math"): a
deleted error update, halved error compensation, codebooks learned on the uncompensated weights, a weaker
k-means, a large refit ridge, reversed packing order, an adapter not applied, resume picking a half-written
checkpoint. For each one a fresh copy of ``src/`` is patched, and pytest runs against it (``PYTHONPATH`` puts
the copy first; ``-x`` stops at the first failure). A mutant is *killed* when the suite fails. Writes
``benchmarks/results/mutation_check.json`` and prints a table; exit status 1 if any mutant survives.

    python benchmarks/mutation_check.py            # the test files each mutation should trip (minutes)
    python benchmarks/mutation_check.py --full     # the whole suite for every mutant
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import machine_meta, write_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    name: str
    file: str  # relative to src/sketchtune
    old: str
    new: str
    tests: tuple[str, ...]  # test files expected to catch it (all of tests/ with --full)


KMEANS_TEST = "tests/test_math.py::test_fast_kmeans_within_stated_excess_of_exact_optimum"

MUTATIONS = [
    Mutation("drop the error update between blocks", "sketch/algorithm.py",
             "            W[:, i2:] -= err.T @ U[i1:i2, i2:]\n", "", ("tests/test_math.py",)),
    Mutation("halve the error compensation", "sketch/algorithm.py",
             "e = (w - q) / U1[j, j]", "e = 0.5 * (w - q) / U1[j, j]", ("tests/test_math.py",)),
    Mutation("codebooks on the original, not the compensated weights", "sketch/algorithm.py",
             "cb = codebook_fn(W[:, start:stop],", "cb = codebook_fn(weight.detach().float()[:, start:stop],",
             ("tests/test_math.py",)),
    Mutation("no Lloyd refinement after the DP", "sketch/kmeans.py",
             "    for _ in range(max_iters):\n", "    for _ in range(0):\n", (KMEANS_TEST,)),
    Mutation("binning: equal-count bins only", "sketch/kmeans.py",
             " | (by_width[:, 1:] != by_width[:, :-1])", "", (KMEANS_TEST,)),
    Mutation("binning: equal-width bins only", "sketch/kmeans.py",
             "((by_count[:, 1:] != by_count[:, :-1]) | ", "(", (KMEANS_TEST,)),
    Mutation("refit ridge 1e-4 -> 0.3", "sketch/refit.py", "ridge: float = 1e-4", "ridge: float = 0.3",
             ("tests/test_math.py",)),
    Mutation("reversed code order in packed runs (pack and unpack)", "layout.py",
             "shifts = torch.arange(CODES_PER_RUN, device=codes.device) * bits",
             "shifts = (CODES_PER_RUN - 1 - torch.arange(CODES_PER_RUN, device=codes.device)) * bits",
             ("tests/test_math.py", "tests/test_packing.py")),
    Mutation("generate ignores --adapter", "workflows.py", "lm, tok = load_for_eval(model, adapter,",
             "lm, tok = load_for_eval(model, None,", ("tests/test_train.py", "tests/test_reliability.py")),
    Mutation("eval-tasks ignores --adapter", "workflows.py", "lm, tokenizer = load_for_eval(model, adapter,",
             "lm, tokenizer = load_for_eval(model, None,", ("tests/test_train.py",)),
    Mutation("load_for_eval drops the adapter", "modeling.py", "        load_adapter(model, adapter)\n",
             "        pass\n", ("tests/test_train.py",)),
    Mutation("resume takes a checkpoint killed mid-save", "train/trainer.py",
             'if (p / "trainer_state.json").is_file()]', "]", ("tests/test_train.py",)),
    Mutation("adapter without sketch_adapter.json accepted", "train/adapter.py",
             "    if not cfg_file.is_file():\n        raise", "    if False:\n        raise",
             ("tests/test_reliability.py",)),
]


def _apply(src_copy: Path, m: Mutation) -> None:
    path = src_copy / "sketchtune" / m.file
    text = path.read_text()
    if text.count(m.old) < 1:
        raise SystemExit(f"mutation {m.name!r}: pattern not found in {m.file}; update this script")
    if m.name.startswith("reversed code order"):  # pack and unpack both
        text = text.replace(m.old, m.new).replace(
            "shifts = torch.arange(CODES_PER_RUN, device=packed.device) * bits",
            "shifts = (CODES_PER_RUN - 1 - torch.arange(CODES_PER_RUN, device=packed.device)) * bits")
    else:
        text = text.replace(m.old, m.new, 1)
    path.write_text(text)


def run_mutant(m: Mutation, full: bool, timeout: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        src_copy = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src_copy, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
        _apply(src_copy, m)
        env = {**os.environ, "PYTHONPATH": str(src_copy)}
        targets = ["tests"] if full else list(m.tests)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *targets],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - t0
    failed = [l.split(" ", 1)[1].split(" - ")[0] for l in proc.stdout.splitlines() if l.startswith("FAILED ")]
    return {"mutation": m.name, "file": m.file, "tests": targets, "killed": proc.returncode != 0,
            "caught_by": failed[:3], "seconds": round(seconds, 1), "pytest_exit": proc.returncode}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="run the whole suite for every mutant")
    p.add_argument("--only", default=None, help="substring of the mutation names to run")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per mutant")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutation_check.json"))
    args = p.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or args.only in m.name]
    rows = []
    print(f"{'mutation':<58}{'killed':>8}{'s':>7}  caught by")
    for m in chosen:
        row = run_mutant(m, args.full, args.timeout)
        rows.append(row)
        print(f"{m.name:<58}{'yes' if row['killed'] else 'NO':>8}{row['seconds']:>7.0f}  "
              f"{', '.join(row['caught_by']) or '-'}", flush=True)
    survived = [r["mutation"] for r in rows if not r["killed"]]
    write_json(args.out, {"meta": {**machine_meta(), "full_suite": args.full}, "rows": rows, "survived": survived})
    print(f"\n{len(rows) - len(survived)}/{len(rows)} mutants killed" + (f"; survived: {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
