"""What a run needs to be reproduced: library versions, device, threads, git state, pip freeze."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from .secrets import redact

if TYPE_CHECKING:
    import torch

_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str, cwd: Path | str = _ROOT) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    """The CPU model ("AMD EPYC 9R14 ..."), not just the architecture that platform.processor() gives on Linux."""
    with suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, str]:
    """Tags `env.*` for the parent run."""
    import torch  # here, not at the top: pip_freeze and cpu_name need no torch

    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "env.python": platform.python_version(),
        "env.torch": torch.__version__,
        **{f"env.{package}": _version(package) for package in ("transformers", "mlflow", "numpy", "amrepro")},
        "env.device": device.type,
        "env.device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "env.cuda": torch.version.cuda or "none",
        "env.dtype": "float32",
        "env.threads": str(torch.get_num_threads()),
        "env.platform": platform.platform(),
        "env.git_commit": commit or "unknown",
        "env.git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
    }


def pip_freeze() -> bytes:
    """The lines `pip freeze` writes for this interpreter's packages, read from their metadata in this process
    (a `pip freeze` subprocess cost ~0.5 s of CPU in every run): `name==version`, sorted by name; an editable
    install as its git remote and commit (or its folder); one installed from a URL or file as `name @ URL`.
    Like pip freeze, pip itself is left out, and setuptools, wheel and distribute below Python 3.12."""
    import json
    from urllib.parse import unquote, urlparse

    skip = {"pip"} | ({"setuptools", "wheel", "distribute"} if sys.version_info < (3, 12) else set())
    # the installed packages, in sys.path order (the first of a name is the one imported), without the current
    # folder that `python -c`/`-m` put first: a source checkout there has an .egg-info, not an installation
    here = os.getcwd()
    paths = [p for p in sys.path if p and os.path.abspath(p) != here]
    lines: dict[str, tuple[str, str]] = {}  # canonical name -> (name, line)
    for dist in importlib.metadata.distributions(path=paths):
        name = dist.metadata["Name"] or ""
        key = re.sub(r"[-_.]+", "-", name).lower()
        if not key or key in skip or key in lines:
            continue
        line = f"{name}=={dist.version}"
        try:
            direct = json.loads(dist.read_text("direct_url.json") or "{}")
        except (OSError, ValueError):
            direct = {}
        url = direct.get("url", "")
        if direct.get("dir_info", {}).get("editable"):
            line = _editable_line(name, dist.version, unquote(urlparse(url).path) if url.startswith("file:") else url)
        elif "vcs_info" in direct:
            vcs = direct["vcs_info"]
            line = f"{name} @ {vcs.get('vcs', 'git')}+{redact(url, mask='')}@{vcs.get('commit_id', '')}"
        elif url:
            line = f"{name} @ {redact(url, mask='')}"
        lines[key] = (name, line)
    return "".join(f"{line}\n" for name, line in sorted(lines.values(), key=lambda n: n[0].lower())).encode()


def _editable_line(name: str, version: str, path: str) -> str:
    """pip freeze's line for an editable install: `-e git+REMOTE@COMMIT#egg=NAME` in a git checkout with a
    remote (installable elsewhere), else the folder under a comment that says why."""
    commit = _git("rev-parse", "HEAD", cwd=path) if os.path.isdir(path) else ""
    if not commit:
        return f"# Editable install with no version control ({name}=={version})\n-e {path}"
    remotes = dict(line.split(" ", 1) for line in _git("config", "--get-regexp", r"remote\..*\.url", cwd=path)
                   .splitlines() if " " in line)
    remote = remotes.get("remote.origin.url") or next(iter(remotes.values()), "")
    if not remote:
        return f"# Editable Git install with no remote ({name}=={version})\n-e {path}"
    scp = re.match(r"^(\w+@)?([^/:]+):(\w[^:]*)$", remote)  # git@host:owner/repo, as pip rewrites it
    if re.match(r"^\w+://", remote):
        url = remote
    elif os.path.exists(remote):
        url = Path(remote).absolute().as_uri()
    elif scp:
        url = f"ssh://{scp.group(1) or ''}{scp.group(2)}/{scp.group(3)}"
    else:
        return f"# Editable Git install with an invalid remote {remote!r} ({name}=={version})\n-e {path}"
    url = redact(url, mask="")  # a token in the remote (https://user:TOKEN@host/...) never goes into a run's files
    top = _git("rev-parse", "--show-toplevel", cwd=path)
    sub = os.path.relpath(path, top) if top else "."
    return f"-e git+{url}@{commit}#egg={name.replace('-', '_')}" + (f"&subdirectory={sub}" if sub != "." else "")


def busy_cores_note() -> str | None:
    """A warning when other processes already keep the cores busy: torch's threads then spin against them
    (docs/speed.md: 4 runs at once on 2 cores took 196 s with the default threads, 45 s with --threads 1)."""
    import torch

    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    try:
        load = os.getloadavg()[0]  # runnable processes, averaged over the last minute
    except OSError:
        return None
    if threads > 1 and load >= cores:
        return (f"the machine is busy (load {load:.1f} on {cores} cores) and torch uses {threads} threads, which "
                "spin against the other processes; when several runs share the cores, --threads 1 is much faster.")
