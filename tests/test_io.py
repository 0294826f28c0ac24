"""Atomic writes (sketchtune._io): a reader never sees half a file, and an interrupted write loses nothing —
the previous file stays as it was and no temp file is left beside it."""

import json
import multiprocessing as mp

import pytest
import torch
from safetensors.torch import load_file

import sketchtune
from sketchtune import _io
from sketchtune._io import save_safetensors_atomic, write_json_atomic, write_text_atomic
from sketchtune.train.adapter import WEIGHTS_NAME, load_adapter, save_adapter


def _rewrite(path: str, n: int) -> None:
    for i in range(n):  # payloads of alternating size, so that a torn read would show as a parse error
        write_text_atomic(path, json.dumps({"i": i, "pad": "x" * (200_000 if i % 2 else 10)}))


def test_text_write_is_never_seen_half_written(tmp_path):
    """Results JSON and evidence subsets are read by one process while another rewrites them."""
    target = tmp_path / "test.json"
    write_text_atomic(target, json.dumps({"i": -1}))
    writer = mp.get_context("spawn").Process(target=_rewrite, args=(str(target), 300))
    writer.start()
    seen = set()
    while writer.is_alive() or not seen:
        seen.add(json.loads(target.read_text())["i"])  # raises on a torn file
    writer.join(60)
    assert writer.exitcode == 0 and json.loads(target.read_text())["i"] == 299
    assert [p.name for p in tmp_path.iterdir()] == ["test.json"]  # no temp file left behind


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "progress.json"
    write_json_atomic(target, {"done": [0, 1]})
    before = target.read_bytes()

    def half_then_die(tmp):
        tmp.write_text('{"done": [0, 1, 2')
        raise KeyboardInterrupt  # Ctrl-C half-way through the write

    with pytest.raises(KeyboardInterrupt):
        _io.replace_atomically(target, half_then_die)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]

    good = {"a": torch.arange(6.0).reshape(2, 3)}
    layer = tmp_path / "layer-00000.safetensors"
    save_safetensors_atomic(good, layer)
    with pytest.raises(ValueError):  # safetensors refuses a non-contiguous tensor part-way through a save
        save_safetensors_atomic({"a": torch.zeros(2, 3), "b": torch.zeros(3, 4).t()}, layer)
    torch.testing.assert_close(load_file(str(layer)), good, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer-00000.safetensors", "progress.json"]


def test_interrupted_adapter_save_keeps_the_previous_adapter(sketched_dir, tmp_path, monkeypatch):
    """A run killed while it saves its adapter (e.g. at the end of training) leaves the last good one loadable."""
    model, _ = sketchtune.load(sketched_dir, dtype=torch.float32)
    out = save_adapter(model, tmp_path / "adapter")
    saved = (out / WEIGHTS_NAME).read_bytes()
    with torch.no_grad():
        next(m for m in model.modules() if hasattr(m, "codebook")).codebook.add_(1.0)

    real_save = _io.save_file

    def save_then_die(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # the kill lands after part of the file reached the disk
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(_io, "save_file", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, out)
    assert (out / WEIGHTS_NAME).read_bytes() == saved
    assert sorted(p.name for p in out.iterdir()) == ["sketch_adapter.json", WEIGHTS_NAME]
    base, _ = sketchtune.load(sketched_dir, dtype=torch.float32)
    load_adapter(base, out)  # still a valid adapter for its base
