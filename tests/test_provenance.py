"""What every run records so that it can be reproduced."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pip_freeze_artifact_has_the_lines_pip_freeze_writes():
    """environment/pip-freeze.txt is read in-process (no pip subprocess per run), yet a user can pass it to
    `pip install -r`: the same requirement lines as `pip freeze`, in its order. Both run from the checkout, as
    `mlflow run .` starts amrepro: the .egg-info that `pip install -e .` leaves there is not the installation."""
    script = "import sys\nfrom amrepro.provenance import pip_freeze\nsys.stdout.write(pip_freeze().decode())\n"
    ours, theirs = (subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout.splitlines()
                    for args in (["-c", script], ["-m", "pip", "freeze"]))
    requirements = [line for line in ours if not line.startswith("#")]
    assert requirements == [line for line in theirs if not line.startswith("#")]
    assert any("amrepro" in line for line in ours)  # amrepro itself, however it was installed
