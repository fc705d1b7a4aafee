"""The command line: options -> one Config -> commands. Heavy imports (torch, mlflow) happen inside the
commands, so `amrepro --help` is instant."""

from __future__ import annotations

import os
import sys

import typer

from .config import AmreproError, Config, NoResult, help_for

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Is activation maximization reproducible? Optimize one neuron's input from many seeds, "
                       "decode, compare, and track every run in MLflow (store: MLFLOW_TRACKING_URI).")

_D = Config()


@app.callback()
def _root() -> None:
    """Is activation maximization reproducible? Optimize one neuron's input from many seeds, decode, compare,
    and track every run in MLflow (store: MLFLOW_TRACKING_URI, default sqlite mlflow.db + ./mlruns)."""


def _guard(fn, *args, **kwargs):
    """One clear sentence and a non-zero exit instead of a traceback (AMREPRO_DEBUG=1 shows it).
    Exit codes: 2 bad input or unusable store, 1 no result, 3 store lost after the science (results kept in
    a file), 130 Ctrl-C, 143 SIGTERM."""
    import signal

    from . import signals
    from .report import errors

    saved = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    signals.install()  # SIGTERM ends runs like Ctrl-C; neither cuts a store call in half
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except signals.Terminated as interrupt:
        errors.print(f"terminated (SIGTERM): {interrupt or 'nothing was logged yet.'}", soft_wrap=True, markup=False)
        raise typer.Exit(143)
    except AmreproError as error:
        errors.print(f"error: {error}", soft_wrap=True, markup=False)
        raise typer.Exit(2)
    except NoResult as error:
        errors.print(f"error: {error}", soft_wrap=True, markup=False)
        raise typer.Exit(1)
    except KeyboardInterrupt as interrupt:
        errors.print(f"interrupted: {interrupt or 'nothing was logged yet.'}", soft_wrap=True, markup=False)
        raise typer.Exit(130)
    except Exception as error:  # noqa: BLE001
        if type(error).__name__ == "StoreLost":  # tracking.StoreLost (not imported here: it would import numpy)
            errors.print(f"error: {error}", soft_wrap=True, markup=False)
            raise typer.Exit(3)
        if os.environ.get("AMREPRO_DEBUG"):
            raise
        errors.print(f"error: {type(error).__name__}: {error} (set AMREPRO_DEBUG=1 for the traceback)",
                     soft_wrap=True, markup=False)
        raise typer.Exit(1)
    finally:
        if all(handler is not None for handler in saved):
            signal.signal(signal.SIGINT, saved[0])
            signal.signal(signal.SIGTERM, saved[1])


@app.command()
def run(
    runs: int = typer.Option(_D.runs, help=help_for("runs")),
    epochs: int = typer.Option(_D.epochs, help=help_for("epochs")),
    n_tokens: int = typer.Option(_D.n_tokens, help=help_for("n_tokens")),
    layer: int = typer.Option(_D.layer, help=help_for("layer")),
    dim: int = typer.Option(_D.dim, help=help_for("dim")),
    target: str = typer.Option(_D.target, help=help_for("target")),
    lr: float = typer.Option(_D.lr, help=help_for("lr")),
    l2: float = typer.Option(_D.l2, help=help_for("l2")),
    seed: int = typer.Option(_D.seed, help=help_for("seed")),
    model: str = typer.Option(_D.model, help=help_for("model")),
    device: str = typer.Option(_D.device, help=help_for("device")),
    threads: int = typer.Option(_D.threads, help=help_for("threads")),
    controls: int = typer.Option(_D.controls, help=help_for("controls")),
    experiment: str = typer.Option("", help="MLflow experiment name (default: MLFLOW_EXPERIMENT_NAME / "
                                            "MLFLOW_EXPERIMENT_ID if set, else 'amrepro'; under `mlflow run`, "
                                            "its --experiment-name)."),
):
    """Run the experiment: RUNS seeds batched, one MLflow parent run with a child run per seed."""
    config = Config(model=model, layer=layer, dim=dim, target=target, runs=runs, epochs=epochs,
                    n_tokens=n_tokens, lr=lr, l2=l2, seed=seed, device=device, threads=threads,
                    controls=controls)

    def go():
        from . import commands

        commands.run(config, experiment or None)

    _guard(go)


@app.command()
def sweep(
    targets: str = typer.Option("", help="Targets: comma-separated blocks.B.SITE[SEL], SEL an index i, a range a:b "
                                         "(b excluded) or random:K (K indices drawn from --seed), e.g. "
                                         "'blocks.8.hook_resid_pre[0:768]' or 'blocks.6.mlp.hook_post[random:64]'."),
    workers: int = typer.Option(0, help="Ray workers (each loads the model once); 0 = no Ray, in this process. "
                                        "Local Ray unless --ray-address / RAY_ADDRESS."),
    ray_address: str = typer.Option("", help="Join this Ray cluster (e.g. ray://head:10001 or auto) instead of "
                                             "starting a local one; default RAY_ADDRESS."),
    chunk: int = typer.Option(0, help="Targets per batch (one forward serves chunk x runs rows); 0 = enough "
                                      "batches for every worker, at most 64 targets each."),
    resume: str = typer.Option("", help="SWEEP_RUN_ID: run the targets of that sweep that have no FINISHED parent, "
                                        "with its own params (the other science options are ignored)."),
    runs: int = typer.Option(_D.runs, help=help_for("runs")),
    epochs: int = typer.Option(_D.epochs, help=help_for("epochs")),
    n_tokens: int = typer.Option(_D.n_tokens, help=help_for("n_tokens")),
    lr: float = typer.Option(_D.lr, help=help_for("lr")),
    l2: float = typer.Option(_D.l2, help=help_for("l2")),
    seed: int = typer.Option(_D.seed, help=help_for("seed")),
    model: str = typer.Option(_D.model, help=help_for("model")),
    device: str = typer.Option(_D.device, help=help_for("device")),
    threads: int = typer.Option(_D.threads, help=help_for("threads") + " With --workers: per worker, default the "
                                                                        "cores shared out."),
    controls: int = typer.Option(_D.controls, help=help_for("controls")),
    experiment: str = typer.Option("", help="MLflow experiment name (as for run)."),
):
    """Run many targets: a sweep run, one parent per target (as `amrepro run`) with a child per seed; a table,
    sweep/* metrics and a map on the sweep run."""
    if not targets and not resume:
        from .report import errors

        errors.print("error: --targets is required (or --resume SWEEP_RUN_ID).", soft_wrap=True, markup=False)
        raise typer.Exit(2)
    config = Config(model=model, runs=runs, epochs=epochs, n_tokens=n_tokens, lr=lr, l2=l2, seed=seed,
                    device=device, threads=threads, controls=controls)

    def go():
        from . import commands

        commands.sweep(config, targets, workers, ray_address or None, chunk, resume or None, experiment or None)

    _guard(go)


@app.command()
def decode(run_id: str = typer.Argument(..., help="A child run id, or a parent run id for all its children.")):
    """Re-derive tokens from a run's logged final embeddings (no optimization); exit 1 if they differ
    from the logged tokens.json."""

    def go():
        from . import commands

        if not commands.decode(run_id):
            raise typer.Exit(1)

    _guard(go)


@app.command()
def reproduce(
    run_id: str = typer.Argument(..., help="A parent run id, or one child run id."),
    device: str = typer.Option("", help="Override the device the run was logged with (then bit-identity "
                                        "is not expected)."),
):
    """Re-run a logged run from its params and compare with its artifacts; exit 0 only when it reproduces."""

    def go():
        from . import commands

        if not commands.reproduce(run_id, device or None):
            raise typer.Exit(1)

    _guard(go)


@app.command("log")
def log_(file: str = typer.Argument(..., help="An outcome file, amrepro-outcomes/<parent run id>.npz.")):
    """Log the results an interrupted or disconnected `amrepro run` kept in an outcome file (into its parent run
    when that still exists and is not FINISHED, else a new one), end the runs FINISHED and delete the file.
    Store: MLFLOW_TRACKING_URI, else the one the file was made for."""

    def go():
        from . import commands

        commands.log_file(file)

    _guard(go)


@app.command()
def doctor(all_hosts: bool = typer.Option(False, "--all", help="Also end RUNNING runs whose process cannot be "
                                                               "checked from this host (other hosts, no pid tag).")):
    """End the runs a killed amrepro process left RUNNING: every RUNNING amrepro run of the store, one line
    each; those of this host whose process is gone are ended KILLED, live ones and other hosts' are left alone."""

    def go():
        from . import commands

        commands.doctor(all_hosts)

    _guard(go)


def main() -> None:
    app(prog_name="amrepro")


if __name__ == "__main__":
    sys.exit(main())
