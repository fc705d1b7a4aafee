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
