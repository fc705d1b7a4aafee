"""Tests only (test_team.py): a process started with this folder on PYTHONPATH, AMREPRO_TEST_EXIT_AFTER_CHILDREN=N
and AMREPRO_TEST_EXIT_MARKER=FILE exits at once (os._exit, like a SIGKILL or the OOM killer) right after it logs
its N-th seed run, if it is the first to get there (the marker file is made once). Python runs sitecustomize at
start-up in every process, Ray's workers included, so the package itself carries no test hook."""

import os

if os.environ.get("AMREPRO_TEST_EXIT_AFTER_CHILDREN") and os.environ.get("AMREPRO_TEST_EXIT_MARKER"):
    import amrepro.layout

    _log_seed_run, _count = amrepro.layout.log_seed_run, []

    def _log_seed_run_then_maybe_exit(*args, **kwargs):
        _log_seed_run(*args, **kwargs)
        _count.append(1)
        if len(_count) >= int(os.environ["AMREPRO_TEST_EXIT_AFTER_CHILDREN"]):
            try:
                fd = os.open(os.environ["AMREPRO_TEST_EXIT_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os._exit(1)

    amrepro.layout.log_seed_run = _log_seed_run_then_maybe_exit
