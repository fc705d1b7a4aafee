"""Which process owns a RUNNING run: tags on every run amrepro creates, so that a later `amrepro doctor` (or
`amrepro run`) on this host can tell a run whose process was SIGKILLed from one that is still running."""

from __future__ import annotations

import os
import socket

HOST = socket.gethostname()
HOST_TAG, PID_TAG, PID_START_TAG = "amrepro.host", "amrepro.pid", "amrepro.pid_start"  # layout.py re-exports them


def _process_start(pid: int) -> str:
    """'<boot id>:<start ticks>' of a live process (Linux), '' where /proc cannot tell: with the pid it tells
    a live owner from a later process that reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = f.read().rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}:{ticks}"
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """amrepro.host, amrepro.pid and amrepro.pid_start of this process."""
    pid = os.getpid()
    return {HOST_TAG: HOST, PID_TAG: str(pid), PID_START_TAG: _process_start(pid)}


def owner_alive(tags: dict[str, str]) -> bool | None:
    """True/False for a run made on this host (is its process still the one that made it?), None when it
    cannot be verified (another host, or no amrepro.pid tag)."""
    if tags.get(HOST_TAG) != HOST or not tags.get(PID_TAG, "").isdigit():
        return None
    pid = int(tags[PID_TAG])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    started = tags.get(PID_START_TAG, "")
    return not started or _process_start(pid) in ("", started)


def refuse_live(runs, doing: str, force: bool = False) -> None:
    """Before `--resume`, `log` or a discard touches runs: refuse (AmreproError, one sentence) when one is RUNNING
    and its process is alive on this host, or cannot be checked from here (another host, no process tags)
    unless force (as `amrepro doctor --all`). runs: records with .id, .status and .tags."""
    from .config import AmreproError

    for run in runs:
        if run.status != "RUNNING":
            continue
        alive, tags = owner_alive(run.tags), run.tags
        if alive:
            raise AmreproError(f"run {run.id} is still being written by amrepro process {tags[PID_TAG]} on this "
                               f"host; {doing} now would destroy its work: let it finish, or stop it (kill "
                               f"{tags[PID_TAG]}) and try again.")
        if alive is None and not force:
            where = (f"pid {tags[PID_TAG]} on {tags.get(HOST_TAG)}" if PID_TAG in tags else "no process tags")
            raise AmreproError(f"run {run.id} is RUNNING and its process ({where}) cannot be checked from {HOST}; "
                               f"if it is gone, {doing} with --force.")


def refuse_live_id(store, run_id: str, doing: str, force: bool = False) -> None:
    """refuse_live for one run id; a run the store does not have is nobody's live work."""
    try:
        run = store.get(run_id)
    except Exception:  # noqa: BLE001 - no such run here (the store answering was checked when connecting)
        return
    refuse_live([run], doing, force)
