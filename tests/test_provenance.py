"""What every run records so that it can be reproduced."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pip_freeze_artifact_has_the_lines_pip_freeze_writes():
    """environment/pip-freeze.txt is read in-process (no pip subprocess per run), yet a user can pass it to
    `pip install -r`: the same requirement lines as `pip freeze`, in its order (amrepro's own line included: a
    folder, or a git remote and commit as in CI's clone). Both run from the checkout, as `mlflow run .` starts
    amrepro: the .egg-info that `pip install -e .` leaves there is not the installation."""
    script = "import sys\nfrom amrepro.provenance import pip_freeze\nsys.stdout.write(pip_freeze().decode())\n"
    ours, theirs = (subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout.splitlines()
                    for args in (["-c", script], ["-m", "pip", "freeze"]))
    requirements = [line for line in ours if not line.startswith("#")]
    assert requirements == [line for line in theirs if not line.startswith("#")]
    assert any("amrepro" in line for line in ours)  # amrepro itself, however it was installed


def test_editable_install_in_a_git_checkout_is_its_remote_and_commit(tmp_path):
    """As pip freeze writes it, so that `pip install -r` works on another machine: an scp-style remote becomes
    ssh://, a project below the repository root gets &subdirectory=."""
    from amrepro.provenance import _editable_line

    repo, project = tmp_path / "repo", tmp_path / "repo" / "sub"
    project.mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'my-pkg'\n")

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x")
    commit = git("rev-parse", "HEAD")
    assert _editable_line("my-pkg", "1.0", str(project)) == \
        f"# Editable Git install with no remote (my-pkg==1.0)\n-e {project}"
    git("remote", "add", "origin", "git@github.com:owner/repo.git")
    assert _editable_line("my-pkg", "1.0", str(project)) == \
        f"-e git+ssh://git@github.com/owner/repo.git@{commit}#egg=my_pkg&subdirectory=sub"
    assert _editable_line("my-pkg", "1.0", str(tmp_path)) == \
        f"# Editable install with no version control (my-pkg==1.0)\n-e {tmp_path}"


def test_a_token_in_a_git_remote_stays_out_of_the_pip_freeze(tmp_path):
    """environment/pip-freeze.txt is an artifact anyone with the store can read: an editable install whose
    remote carries a token (https://user:TOKEN@host/...) is recorded without it."""
    from amrepro.provenance import _editable_line

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=tmp_path, check=True)
    for remote, shown in (("https://me:ghp_S3CRET@github.com/o/r.git", "https://me@github.com/o/r.git"),
                          ("https://ghp_S3CRET@github.com/o/r.git", "https://github.com/o/r.git")):
        subprocess.run(["git", "remote", "remove", "origin"], cwd=tmp_path, capture_output=True)
        subprocess.run(["git", "remote", "add", "origin", remote], cwd=tmp_path, check=True)
        line = _editable_line("my-pkg", "1.0", str(tmp_path))
        assert "S3CRET" not in line and line.startswith(f"-e git+{shown}@")


def test_redact_hides_passwords_and_tokens_and_keeps_the_rest():
    from amrepro.secrets import redact

    assert redact("postgresql://user:PASS@db:5432/mlflow") == "postgresql://user:***@db:5432/mlflow"
    assert redact("store at http://u:p@ss@host:5000/x failed") == "store at http://u:***@host:5000/x failed"
    assert redact("git+https://TOKEN@github.com/o/r.git@abc#egg=r") == "git+https://***@github.com/o/r.git@abc#egg=r"
    for kept in ("ssh://git@github.com/o/r.git", "sqlite:///tmp/mlflow.db", "http://127.0.0.1:5000", "a@b.c"):
        assert redact(kept) == kept
    assert redact("postgresql://user:PASS@db/m", mask="") == "postgresql://user@db/m"
