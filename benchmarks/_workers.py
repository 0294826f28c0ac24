"""Several benchmark processes resuming one results JSON at once, each taking units the others have not.

The fine-tuning evidence (#15) is days of single-core units; a machine with two free cores runs two workers.
Each worker keeps the JSON in memory and rewrites it whole, so without coordination the last writer would drop
the other's units. Here every write is read-merge-write under an exclusive ``flock`` (units are only ever
added, so merging is a union), and a unit is *claimed* in the JSON before it starts: another worker skips a
unit whose claim belongs to a live process, and a claim of a process that died (killed, machine rebooted) is
ignored, so an interrupted unit is simply taken again by the next ``--resume``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

#: How long a claim from another host (a shared filesystem; its process cannot be checked from here) holds.
FOREIGN_CLAIM_HOURS = 24.0


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Exclusive lock on ``lock_path`` (created if missing). A separate file, because the JSON itself is
    replaced atomically on every write and a lock on a replaced inode protects nothing."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc), to tell a live worker from a reused pid;
    None where there is no such process, or only its zombie (dead, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces or ')'
    return None if fields[0] == "Z" else int(fields[19])  # state (field 3), starttime (field 22)


def _boot_id() -> str | None:
    """This boot of this machine (Linux); a claim from another boot is dead whatever its pid."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def my_claim() -> dict:
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "start_ticks": _start_ticks(os.getpid()),
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def claim_is_live(claim: dict | None) -> bool:
    """Whether ``claim`` belongs to a worker that may still be running (never this process's own)."""
    if not claim:
        return False
    if claim.get("host") != socket.gethostname():  # another machine sharing the file: trust it a while
        since = dt.datetime.fromisoformat(claim["since"])
        return dt.datetime.now(dt.timezone.utc) - since < dt.timedelta(hours=FOREIGN_CLAIM_HOURS)
    if claim.get("boot_id") not in (None, _boot_id()):
        return False  # this machine (by name; a new VM may reuse it) in an earlier boot: that worker is gone
    pid = int(claim["pid"])
    if pid == os.getpid():
        return False
    ticks = _start_ticks(pid)
    if ticks is None:  # no such process (or no /proc: fall back to a signal-0 probe)
        if Path("/proc/self/stat").exists():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return claim.get("start_ticks") in (None, ticks)


def merge_from_disk(state: dict, out: Path) -> list[str]:
    """Adopt into ``state`` the units and claims another worker wrote to ``out``; return the methods it listed.

    Units already in ``state`` win (a unit's row never changes once written); claims are the file's, except
    this process's own, which stay as ``state`` has them.
    """
    state.setdefault("claims", {})
    if not out.is_file():
        return []
    disk = json.loads(out.read_text())
    for uid, row in disk.get("units", {}).items():
        state["units"].setdefault(uid, row)
    mine = {u: c for u, c in state.get("claims", {}).items() if c.get("pid") == os.getpid()
            and c.get("host") == socket.gethostname()}
    state["claims"] = {**{u: c for u, c in disk.get("claims", {}).items() if u not in state["units"]}, **mine}
    methods = list(disk.get("meta", {}).get("methods", []))
    if "meta" in state:  # a claim written between two saves keeps every worker's methods too
        state["meta"]["methods"] = union(methods, state["meta"].get("methods", []))
    return methods


def union(first: list[str], then: list[str]) -> list[str]:
    """``first`` followed by the items of ``then`` it lacks, order kept."""
    return first + [m for m in then if m not in first]
