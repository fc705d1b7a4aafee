"""Tests only (test_team.py, test_lean.py): a process started with this folder on PYTHONPATH,
AMREPRO_TEST_EXIT_AFTER_CHILDREN=N and AMREPRO_TEST_EXIT_MARKER=FILE exits at once (os._exit, like a SIGKILL or the
OOM killer) right after it logs its N-th seed run (lean layout: right before it logs its N-th target, whose parent
then stays RUNNING with nothing logged), if it is the first to get there (the marker file is made once). Python
runs sitecustomize at start-up in every process, Ray's workers included, so the package itself carries no test
hook."""

import os

if os.environ.get("AMREPRO_TEST_EXIT_AFTER_CHILDREN") and os.environ.get("AMREPRO_TEST_EXIT_MARKER"):
    import amrepro.layout
    import amrepro.lean

    _log_seed_run, _log_target, _count = amrepro.layout.log_seed_run, amrepro.lean.log_target, []

    def _exit_at_the_nth() -> None:
        _count.append(1)
        if len(_count) >= int(os.environ["AMREPRO_TEST_EXIT_AFTER_CHILDREN"]):
            try:
                fd = os.open(os.environ["AMREPRO_TEST_EXIT_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os._exit(1)

    def _log_seed_run_then_maybe_exit(*args, **kwargs):
        _log_seed_run(*args, **kwargs)
        _exit_at_the_nth()

    def _maybe_exit_then_log_target(*args, **kwargs):
        _exit_at_the_nth()
        _log_target(*args, **kwargs)

    amrepro.layout.log_seed_run = _log_seed_run_then_maybe_exit
    amrepro.lean.log_target = _maybe_exit_then_log_target
