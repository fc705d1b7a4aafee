"""The command line: options -> one Config -> commands. Heavy imports (torch, mlflow) happen inside the
commands, so `amrepro --help` is instant."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys

import typer

from .config import AmreproError, Config, help_for, parse_bool
from .errors import NoResult
from .methods import names as method_names

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Is activation maximization reproducible? Optimize one neuron's input from many seeds, "
                       "decode, compare, and track every run in MLflow (store: MLFLOW_TRACKING_URI).")

_FORCE_HELP = ("Touch RUNNING runs whose process cannot be checked from this host (another host, no pid tag); "
               "runs whose process is alive here are never touched.")


def _guard(module: str, function: str, *args):
    """amrepro.MODULE.FUNCTION(*args), imported only now (so `amrepro --help` stays instant), with one clear
    sentence and a non-zero exit instead of a traceback (AMREPRO_DEBUG=1 shows it).
    Exit codes: 2 bad input or unusable store, 1 no result, 3 store lost after the science (results kept in
    a file), 130 Ctrl-C, 143 SIGTERM."""
    import importlib
    import signal

    from . import signals

    saved = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    signals.install()  # SIGTERM ends runs like Ctrl-C; neither cuts a store call in half
    try:
        return getattr(importlib.import_module(f"amrepro.{module}"), function)(*args)
    except signals.Terminated as interrupt:
        _exit(f"terminated (SIGTERM): {interrupt or 'nothing was logged yet.'}", 143)
    except (AmreproError, NoResult) as error:
        _exit(f"error: {error}", 2 if isinstance(error, AmreproError) else 1)
    except KeyboardInterrupt as interrupt:
        _exit(f"interrupted: {interrupt or 'nothing was logged yet.'}", 130)
    except Exception as error:  # noqa: BLE001
        if type(error).__name__ == "StoreLost":  # tracking.StoreLost (not imported here: it would import numpy)
            _exit(f"error: {error}", 3)
        if os.environ.get("AMREPRO_DEBUG"):
            raise
        _exit(f"error: {type(error).__name__}: {error} (set AMREPRO_DEBUG=1 for the traceback)", 1)
    finally:
        if all(handler is not None for handler in saved):
            signal.signal(signal.SIGINT, saved[0])
            signal.signal(signal.SIGTERM, saved[1])


def _exit(line: str, code: int) -> None:
    """One line on stderr (markup off: a message may hold brackets) and the exit code; also for bad input the
    options alone show (exit 2, before anything is imported)."""
    from .report import errors

    errors.print(line, soft_wrap=True, markup=False)
    raise typer.Exit(code)


def with_config(*, exclude: tuple[str, ...] = ()):
    """Give a command one Typer option per Config field (default and help from the field, so the CLI cannot
    drift from Config), collected into one Config passed as its `config` argument."""
    fields = [f for f in dataclasses.fields(Config) if f.name not in exclude]
    types = {"str": str, "int": int, "float": float, "bool": str}  # bool: a value, see _option

    def decorate(command):
        own = [p for p in inspect.signature(command).parameters.values() if p.name != "config"]
        options = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=types[str(f.type)],
                                     default=_option(f)) for f in fields]

        @functools.wraps(command)
        def wrapper(**kwargs):
            config = Config(**{f.name: _yes_no(f, kwargs.pop(f.name)) if f.type == "bool" else kwargs.pop(f.name)
                               for f in fields})
            return command(config=config, **kwargs)

        wrapper.__signature__ = inspect.Signature(own + options)
        return wrapper

    return decorate


def _option(field) -> typer.Option:
    """A field's option, its default from the environment variable the field names (metadata "env"; the one
    place that reads it, e.g. AMREPRO_FIGURES for --figures). A bool one takes a value, true or false
    (`--figures false`: what MLproject's `--figures {figures}` passes; a flag could not be)."""
    flag = field.type == "bool"
    return typer.Option(str(field.default).lower() if flag else field.default, help=help_for(field.name),
                        metavar="true|false" if flag else None, envvar=field.metadata["env"], show_envvar=False)


def _yes_no(field, value: str) -> bool:
    parsed = parse_bool(value)
    if parsed is None:
        env = field.metadata.get("env")
        source = f" (from {env})" if env and os.environ.get(env) == value else ""
        _exit(f"error: --{field.name.replace('_', '-')} must be true or false (or 1/0, yes/no, on/off), got "
              f"{value!r}{source}.", 2)
    return parsed


_LAYOUT_HELP = ("What a target logs: 'seeds' = a parent with one child run per seed and its figures; 'lean' = "
                "one parent with a per-seed table, one seeds.npz artifact, downsampled curves, figures on demand "
                "(`amrepro figures RUN_ID`).")
_EXPERIMENT_HELP = ("MLflow experiment name (default: MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID if set, else "
                    "'amrepro'; under `mlflow run`, its --experiment-name).")


@app.command()
@with_config()
def run(config: Config, experiment: str = typer.Option("", help=_EXPERIMENT_HELP),
        layout: str = typer.Option("seeds", help=_LAYOUT_HELP)):
    """Run the experiment: RUNS seeds batched, one MLflow parent run with a child run per seed."""
    _guard("commands.run", "run", config, experiment or None, layout)


@app.command()
@with_config(exclude=("method",))
def compare(
    config: Config,
    methods: str = typer.Option(",".join(method_names()), help=f"Comma-separated methods to compare, of "
                                                               f"{', '.join(method_names())}."),
    corpus: str = typer.Option("", help="A UTF-8 text file: the target's activation over every n_tokens window "
                                        "(its max and 99th percentile join the table, its top windows an artifact)."),
    experiment: str = typer.Option("", help=_EXPERIMENT_HELP),
):
    """Compare methods on one target and one set of seeds: a top MLflow run, one nested run per method (each
    with its seed runs), a table and a figure of activation against agreement."""
    _guard("compare", "compare", config, methods, corpus, experiment or None)


@app.command()
@with_config(exclude=("layer", "dim", "target"))
def sweep(
    config: Config,
    targets: str = typer.Option("", help="Targets: comma-separated blocks.B.SITE[SEL], SEL an index i, a range a:b "
                                         "(b excluded) or random:K (K indices drawn from --seed), e.g. "
                                         "'blocks.8.hook_resid_pre[0:768]' or 'blocks.6.mlp.hook_post[random:64]'; "
                                         "an SAE's latents: 'blocks.8.hook_resid_pre@sae:FOLDER[random:64]'; a "
                                         "direction: 'blocks.8.hook_resid_pre@probe.npy'."),
    workers: int = typer.Option(0, help="Ray workers (each loads the model once); 0 = no Ray, in this process. "
                                        "Local Ray unless --ray-address / RAY_ADDRESS. With workers, --threads 0 "
                                        "means the cores shared out among them."),
    ray_address: str = typer.Option("", help="Join this Ray cluster (e.g. ray://head:10001 or auto) instead of "
                                             "starting a local one; default RAY_ADDRESS."),
    chunk: int = typer.Option(0, help="Targets per batch (one forward serves chunk x runs rows); 0 = enough "
                                      "batches for every worker, at most 64 targets each."),
    resume: str = typer.Option("", help="SWEEP_RUN_ID: run the targets of that sweep that have no FINISHED parent, "
                                        "with its own params (the other science options are ignored)."),
    methods: str = typer.Option("", help=f"Comma-separated methods, of {', '.join(method_names())}: a top run with "
                                          "one sweep run per method, the same targets and seeds, and a study table "
                                          "of the methods; default: --method alone."),
    corpus: str = typer.Option("", help="A UTF-8 text file: every target scored on every n_tokens window; the study "
                                        "says whether the best and median seed beat its max and 99th percentile."),
    experiment: str = typer.Option("", help=_EXPERIMENT_HELP),
    layout: str = typer.Option("lean", help=_LAYOUT_HELP + " --resume keeps the sweep's own."),
    force: bool = typer.Option(False, help=_FORCE_HELP),
):
    """Run many targets: a sweep run, one parent per target (lean: with a per-seed table; seeds: a child per
    seed, as `amrepro run`); a table, sweep/* metrics, a map and the study of the layer (study.py) on the sweep
    run."""
    if not targets and not resume:
        _exit("error: --targets is required (or --resume SWEEP_RUN_ID).", 2)
    if methods and resume:
        _exit("error: --methods starts a new study; --resume continues one sweep run: give one of them.", 2)
    if methods:
        _guard("commands.sweep", "sweep_methods", config, targets, methods, corpus, workers, ray_address or None,
               chunk, experiment or None, layout)
    else:
        _guard("commands.sweep", "sweep", config, targets, workers, ray_address or None, chunk, resume or None,
               experiment or None, layout, force, corpus)


@app.command()
def figures(run_id: str = typer.Argument(..., help="A target's parent run id: an `amrepro run` run, a sweep's "
                                                     "target (e.g. from its table), a compare's method run.")):
    """Draw a target's figures (curves, token grid, token frequency, projection gap, hub tokens) from its logged
    results and log them into that run: a lean target's, or those a --figures false run left out."""
    _guard("commands.figures", "figures", run_id)


@app.command()
def decode(run_id: str = typer.Argument(..., help="A child run id, or a parent run id for all its children.")):
    """Re-derive tokens from a run's logged final embeddings (no optimization); exit 1 if they differ
    from the logged tokens.json."""
    if not _guard("commands.decode", "decode", run_id):
        raise typer.Exit(1)


@app.command()
def reproduce(
    run_id: str = typer.Argument(..., help="A parent run id, or one child run id."),
    device: str = typer.Option("", help="Override the device the run was logged with (then bit-identity "
                                        "is not expected)."),
):
    """Re-run a logged run from its params and compare with its artifacts; exit 0 only when it reproduces."""
    if not _guard("commands.reproduce", "reproduce", run_id, device or None):
        raise typer.Exit(1)


@app.command("log")
def log_(file: str = typer.Argument(..., help="An outcome file, amrepro-outcomes/<parent run id>.npz."),
         force: bool = typer.Option(False, help=_FORCE_HELP)):
    """Log the results an interrupted or disconnected `amrepro run` kept in an outcome file (into its parent run
    when that still exists and is not FINISHED, else a new one), end the runs FINISHED and delete the file.
    Store: MLFLOW_TRACKING_URI, else the one the file was made for."""
    _guard("commands.log", "log_file", file, force)


@app.command()
def doctor(all_hosts: bool = typer.Option(False, "--all", help="Also end RUNNING runs whose process cannot be "
                                                               "checked from this host (other hosts, no pid tag).")):
    """End the runs a killed amrepro process left RUNNING: every RUNNING amrepro run of the store, one line
    each; those of this host whose process is gone are ended KILLED, live ones and other hosts' are left alone."""
    _guard("commands.doctor", "doctor", all_hosts)


def main() -> None:
    app(prog_name="amrepro")


if __name__ == "__main__":
    sys.exit(main())
