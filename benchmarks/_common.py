"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path

import psutil
import torch

from sketchtune._io import write_json_atomic, write_text_atomic  # noqa: F401  (re-exported for the harness)


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` is the maximum seen (bytes)."""

    def __init__(self, interval: float = 0.05):
        self.proc, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def nf4_linear(lin: torch.nn.Linear):
    """bitsandbytes NF4 ``Linear4bit`` of ``lin`` (double-quantised scales, fp32 compute), as QLoRA's base holds
    it; bitsandbytes ≥ 0.45 quantises (on ``.to()``) and runs it on CPU. The bias is not carried over (the
    Llama-shaped models benchmarked here have none)."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)
    return q.to("cpu")


def to_nf4(model: torch.nn.Module) -> torch.nn.Module:
    """Every linear layer inside the decoder layers replaced by :func:`nf4_linear`, in place."""
    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if isinstance(lin, torch.nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, nf4_linear(lin))
    return model


def cpu_model() -> str:
    """The CPU's model name (the machines these benchmarks run on change between sessions: AMD EPYC without AMX
    and Intel Xeon with it rank the kernels differently, so every result says which one it came from)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_meta() -> dict:
    return {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Results JSON, written atomically: workers read each other's files while they run."""
    write_json_atomic(path, payload)
