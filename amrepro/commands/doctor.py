"""`amrepro doctor`: every RUNNING amrepro run of the store, one line each; those whose process is gone ended."""

from __future__ import annotations

from .. import report
from ..context import Context, end_leftover, gone_reason, leftovers
from ..layout import HOST_TAG, PID_TAG
from ..tracking import HOST


def doctor(all_hosts: bool = False) -> None:
    """Runs of this host whose process is gone are ended KILLED; live ones are left alone; runs of other hosts
    (or without process tags) cannot be checked from here and are left alone unless all_hosts."""
    store = Context().store
    ended = alive_n = left = 0
    for run, alive in leftovers(store):
        name = f"{run.id} ({run.name})"
        where = f"pid {run.tags[PID_TAG]} on {run.tags[HOST_TAG]}" if PID_TAG in run.tags else "no process tags"
        if alive:
            alive_n += 1
            line = f"running   {name}: {where}, still alive; left alone"
        elif alive is False or all_hosts:
            why = (gone_reason(run, "amrepro doctor") if alive is False else
                   f"its process ({where}) could not be checked from {HOST}; ended by amrepro doctor --all")
            end_leftover(store, run, why)
            ended += 1
            line = f"KILLED    {name}: {why}"
        else:
            left += 1
            line = (f"unchecked {name}: {where}, cannot be checked from {HOST}; left alone "
                    "(`amrepro doctor --all` ends it)")
        report.console.print(line, soft_wrap=True, markup=False)
    report.console.print(f"{ended} run(s) ended KILLED, {alive_n} still running, {left} left alone unchecked "
                         f"in {store.uri}.", soft_wrap=True, markup=False)
