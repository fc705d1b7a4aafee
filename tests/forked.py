"""`python -m amrepro ARGS` as a separate process that does not import torch, transformers and MLflow again.

A new interpreter spends ~10 s of CPU importing them before amrepro does anything; the suite starts many such
processes (signals, SIGKILL leftovers, concurrent writers, a server that goes away). Here each one is forked
from a multiprocessing fork server that imported those libraries once per test worker. The child is still its
own process (own pid, signals, stdio, environment and working directory); what it skips is the interpreter's
start-up. amrepro itself is imported fresh in the child, after its environment is set, as in a real start
(amrepro.tracking reads the environment at import). Tests about start-up itself (`--help` and a bad run id
not importing torch, `mlflow run`) keep using real subprocesses.

This module imports only the standard library: the child unpickles its target from here before it has its
environment.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile

PRELOAD = ["torch", "transformers", "mlflow", "matplotlib.pyplot", "numpy", "typer", "rich",
           # what `amrepro run` imports late, inside functions (`python -X importtime`): ~3 s of each child
           "transformers.modeling_layers", "transformers.activations", "transformers.masking_utils",
           "transformers.models.auto.auto_factory", "transformers.models.gpt2.modeling_gpt2",
           "transformers.tokenization_utils_base", "transformers.tokenization_utils_tokenizers",
           "mlflow.store.tracking.sqlalchemy_store", "sqlalchemy.dialects.sqlite", "alembic.command", "alembic.config"]
_context = None


def _fork_server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _amrepro_main(args: list[str], env: dict[str, str], cwd: str, out_path: str, err_path: str,
                  startup: str | None = None) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = ["amrepro", *args]
    if startup:  # what a fresh interpreter would run at start-up (a sitecustomize.py), before amrepro's main
        import runpy

        runpy.run_path(startup, run_name="sitecustomize")
    from amrepro.cli import main

    main()  # exits through SystemExit: multiprocessing makes its code the process's exit status


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:  # the child ended before it had its output files
        return ""


class Amrepro:
    """The parts of subprocess.Popen the tests use, for `amrepro ARGS` in a forked process."""

    def __init__(self, args, env: dict[str, str], cwd, startup: str | None = None):
        """startup: a sitecustomize.py the child runs first, as Python runs the one on a new interpreter's
        PYTHONPATH at start-up (the fork server started before this child's PYTHONPATH existed)."""
        self._folder = tempfile.mkdtemp(prefix="amrepro-forked-")
        self._out, self._err = os.path.join(self._folder, "stdout"), os.path.join(self._folder, "stderr")
        self._output = None
        self._process = _fork_server().Process(target=_amrepro_main,
                                               args=(list(args), dict(env), str(cwd), self._out, self._err,
                                                     startup and str(startup)))
        self._process.start()
        self.pid = self._process.pid
        self.args = list(args)

    @property
    def returncode(self):
        return self._process.exitcode  # -N for a process that signal N ended, as subprocess reports it

    def poll(self):
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # it ended meanwhile
                pass

    def kill(self) -> None:
        self._process.kill()

    def output_so_far(self) -> tuple[str, str]:
        """(stdout, stderr) written until now, while the process runs: what tests wait on as a readiness signal."""
        return self._output or tuple(_read(path) for path in (self._out, self._err))

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(["amrepro", *self.args], timeout)
        if self._output is None:
            self._output = tuple(_read(path) for path in (self._out, self._err))
            shutil.rmtree(self._folder, ignore_errors=True)
        return self._output
