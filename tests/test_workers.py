"""Parallel benchmark workers on one results JSON (benchmarks/_workers.py): nothing a worker wrote is lost, and a
unit claimed by a live process is not taken twice while a dead worker's claim is."""

import datetime as dt
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from _common import write_json  # noqa: E402
from _workers import _start_ticks, claim_is_live, locked, merge_from_disk, my_claim, union  # noqa: E402


def _worker(out: str, lock: str, name: str, n: int) -> None:
    """Like finetune_evidence: its own in-memory state, rewritten whole after every unit."""
    state = {"units": {}}
    for i in range(n):
        with locked(Path(lock)):
            merge_from_disk(state, Path(out))
            state["units"][f"{name}/{i}"] = {"by": name, "i": i}
            write_json(out, state)


def test_concurrent_writers_lose_no_unit(tmp_path):
    out, lock = tmp_path / "r.json", tmp_path / "r.json.lock"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(out), str(lock), f"w{k}", 40)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    units = json.loads(out.read_text())["units"]
    assert set(units) == {f"w{k}/{i}" for k in range(3) for i in range(40)}


def test_claims_of_live_dead_own_and_foreign_workers():
    assert not claim_is_live(None)
    assert not claim_is_live(my_claim())  # this process never defers to itself
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = {**my_claim(), "pid": sleeper.pid}
        live["start_ticks"] = None  # filled below from /proc when there is one
        live["start_ticks"] = _start_ticks(sleeper.pid)
        assert claim_is_live(live)
        if live["start_ticks"] is not None:  # the same pid number, another process: a stale claim
            assert not claim_is_live({**live, "start_ticks": live["start_ticks"] - 1})
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not claim_is_live(live)  # the worker died: its unit is free again
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        import time
        deadline = time.time() + 30
        while time.time() < deadline and _start_ticks(zombie.pid) is not None:  # exited, not yet reaped
            time.sleep(0.05)
        assert not claim_is_live({**my_claim(), "pid": zombie.pid, "start_ticks": None})
    finally:
        zombie.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # this machine's name, but an earlier boot (a VM that reuses the hostname): that worker is gone
        same_pid = {**my_claim(), "pid": sleeper.pid, "start_ticks": _start_ticks(sleeper.pid)}
        assert claim_is_live(same_pid)
        assert not claim_is_live({**same_pid, "boot_id": "an-earlier-boot"})
    finally:
        sleeper.kill()
        sleeper.wait()
    now = dt.datetime.now(dt.timezone.utc)
    foreign = {"host": socket.gethostname() + "-elsewhere", "pid": 1, "start_ticks": None}
    assert claim_is_live({**foreign, "since": (now - dt.timedelta(hours=1)).isoformat()})
    assert not claim_is_live({**foreign, "since": (now - dt.timedelta(hours=30)).isoformat()})


def test_merge_keeps_own_rows_and_claims_and_drops_claims_of_finished_units(tmp_path):
    out = tmp_path / "r.json"
    other = {"host": "h", "pid": 123, "since": "2026-01-01T00:00:00+00:00"}
    write_json(out, {"meta": {"methods": ["a", "b"]}, "units": {"u1": {"v": "disk"}, "u2": {"v": "disk"}},
                     "claims": {"u2": other, "u3": other}})
    mine = my_claim()
    state = {"units": {"u1": {"v": "memory"}}, "claims": {"u4": mine}}
    assert merge_from_disk(state, out) == ["a", "b"]
    assert state["units"] == {"u1": {"v": "memory"}, "u2": {"v": "disk"}}
    assert state["claims"] == {"u3": other, "u4": mine}
    assert union(["a", "b"], ["c", "a"]) == ["a", "b", "c"]
    assert merge_from_disk({"units": {}}, tmp_path / "missing.json") == []
    stale = {"meta": {"methods": ["b", "c"]}, "units": {}}  # a worker's meta from before another one wrote
    merge_from_disk(stale, out)
    assert stale["meta"]["methods"] == ["a", "b", "c"]
    assert os.path.exists(out)
