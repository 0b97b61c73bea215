"""scripts/deploy.sh's decisions, with docker, make and python3 replaced by stubs.

The stubs keep the one fact that matters, what serve runs ("IMAGE MODEL_URI" in run/running),
and fail the smoke test or the evaluation for whatever run/bad lists (an image or a model URI).
The script itself, its state folder, its lock and its traps are the real ones.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


DOCKER = """#!/bin/bash
echo "docker $*" >> "$RUN/log"
case "$1 $2" in
  "compose version") exit 0;;
  "compose up") echo "$SERVE_IMAGE $MODEL_URI" > "$RUN/running"; exit 0;;
  "compose stop") echo "STOPPED -" > "$RUN/running"; exit 0;;
  "compose ps") read -r img uri < "$RUN/running"; [[ $img != STOPPED ]] && echo serve-1; exit 0;;
  "compose logs") exit 0;;
  "image inspect") [[ $3 == --format ]] && cat "$RUN/digests" 2>/dev/null; exit 0;;
  "inspect --format")
    read -r img uri < "$RUN/running"
    if [[ $3 == *Image* ]]; then echo "$img"; else printf 'PATH=/x\\nMODEL_URI=%s\\n' "$uri"; fi
    exit 0;;
esac
exit 0
"""

# the smoke test (python3 scripts/smoke_test.py) and the evaluation (make) pass or fail by what
# runs; python3 - (the champion's version from MLflow) prints run/champion
FAILS_ON_BAD = """read -r img uri < "$RUN/running"
[[ $img == STOPPED ]] && exit 1
grep -qxF "$img" "$RUN/bad" 2>/dev/null && exit 1
grep -qxF "$uri" "$RUN/bad" 2>/dev/null && exit 1
"""
MAKE = (
    '#!/bin/bash\necho "make $*" >> "$RUN/log"\n[[ -f $RUN/slow ]] && sleep 30\n'
    + FAILS_ON_BAD
    + "exit 0\n"
)
PYTHON3 = (
    '#!/bin/bash\nif [[ $1 == - ]]; then cat >/dev/null; cat "$RUN/champion"; exit 0; fi\n'
    + FAILS_ON_BAD
    + "exit 0\n"
)


class Host:
    """A deployment host: the stubs, the state folder and what serve runs."""

    def __init__(self, tmp: Path) -> None:
        self.run_dir = tmp / "run"
        self.state = tmp / "state"
        stubs = tmp / "stubs"
        for folder in (self.run_dir, stubs):
            folder.mkdir()
        for name, text in {"docker": DOCKER, "make": MAKE, "python3": PYTHON3}.items():
            (stubs / name).write_text(text)
            (stubs / name).chmod(0o755)
        self.env = {
            "PATH": f"{stubs}:/usr/bin:/bin",
            "RUN": str(self.run_dir),
            "DEPLOY_STATE_DIR": str(self.state),
            "WAIT_S": "1",
            "LOCK_WAIT_S": "1",
        }
        self.running = "STOPPED -"
        self.champion = 3

    @property
    def running(self) -> str:
        return (self.run_dir / "running").read_text().strip()

    @running.setter
    def running(self, value: str) -> None:
        (self.run_dir / "running").write_text(value + "\n")

    @property
    def champion(self) -> int:
        return int((self.run_dir / "champion").read_text())

    @champion.setter
    def champion(self, version: int) -> None:
        (self.run_dir / "champion").write_text(f"{version}\n")

    def bad(self, *what: str) -> None:
        (self.run_dir / "bad").write_text("".join(f"{w}\n" for w in what))

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "deploy.sh"), *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def __call__(self, *args: str) -> tuple[int, str]:
        proc = self.start(*args)
        out = self.finish(proc)
        return proc.returncode, out

    @staticmethod
    def finish(proc: subprocess.Popen[str]) -> str:
        """Its output once it exits; past 60 s its process group is killed, never left."""
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return out

    def deployments(self) -> list[str]:
        return (self.state / "deployments").read_text().splitlines()


def uri(version: int) -> str:
    return f"models:/catsdogs/{version}"


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_rollback_restores_the_image_and_model_that_passed_together(host: Host) -> None:
    """Deploy A and B on model 3, reload onto model 4: rollback serves B with model 3 (it
    served image A with model 4, a pair never checked), and a second rollback A with 3."""
    assert host("deploy", "img:A")[0] == 0
    assert host("deploy", "img:B")[0] == 0
    host.champion = 4
    assert host("reload")[0] == 0
    assert host.running == f"img:B {uri(4)}"
    code, out = host("rollback")
    assert code == 0, out
    assert host.running == f"img:B {uri(3)}"
    assert host.deployments() == ["img:A 3", "img:B 3"]
    code, out = host("rollback")
    assert code == 0, out
    assert host.running == f"img:A {uri(3)}"
    code, out = host("rollback")  # nothing before A: refused, A stays
    assert code == 1
    assert "no earlier deployment recorded" in out
    assert host.running == f"img:A {uri(3)}"


def test_a_rollback_that_fails_its_checks_starts_the_current_pair_again(host: Host) -> None:
    assert host("deploy", "img:A")[0] == 0
    assert host("deploy", "img:B")[0] == 0
    host.bad("img:A")
    code, out = host("rollback")
    assert code == 1, out
    assert host.running == f"img:B {uri(3)}"  # it ran A, failing, and stopped there
    assert host.deployments() == ["img:A 3", "img:B 3"]
    assert "rollback to img:A 3 failed; starting img:B 3 again" in out


def test_a_failed_deploy_on_a_host_with_no_state_restarts_what_ran(host: Host) -> None:
    """serve started by hand (or the state folder lost): a failed deploy restarts the container
    that ran before; it stopped serve, an outage where a good replica had been serving."""
    host.running = "img:hand models:/catsdogs@champion"
    host.bad("img:C")
    code, out = host("deploy", "img:C")
    assert code == 1, out
    assert host.running == "img:hand models:/catsdogs@champion"
    assert "no deployment recorded; restarting what ran before" in out


def test_one_deployment_at_a_time(host: Host) -> None:
    host.state.mkdir()
    with (host.state / "lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, out = host("deploy", "img:A")
    assert code == 1
    assert "another deployment holds" in out
    assert host.running == "STOPPED -"


def test_a_deploy_cancelled_midway_puts_back_what_ran(host: Host) -> None:
    """The CD job cancelled or timed out during the evaluation (SIGTERM to its processes): the
    image under test does not stay in service unchecked."""
    assert host("deploy", "img:A")[0] == 0
    (host.run_dir / "slow").touch()
    log = host.run_dir / "log"
    log.write_text("")
    proc = host.start("deploy", "img:B")
    try:
        deadline = time.monotonic() + 20
        while "make" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host.running == f"img:B {uri(3)}"  # under evaluation
        (host.run_dir / "slow").unlink()
        os.killpg(proc.pid, signal.SIGTERM)
        out = host.finish(proc)
    finally:
        if proc.poll() is None:  # an assertion above failed: nothing is left running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert host.running == f"img:A {uri(3)}"
    assert host.deployments() == ["img:A 3"]
    assert "deploy interrupted" in out


def _cd_commit_step(host: Host, action: str, sha: str) -> tuple[int, str, str]:
    """Run the CD workflow's own "which commit" step (its shell, from cd.yml) on this host:
    its exit code, its output and the sha it hands to the checkout."""
    import yaml

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "cd.yml").read_text())
    (step,) = [s for s in workflow["jobs"]["deploy"]["steps"] if s.get("id") == "commit"]
    output = host.run_dir / "github_output"
    output.write_text("")
    env = {**host.env, "ACTION": action, "SHA": sha, "GITHUB_OUTPUT": str(output)}
    proc = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", step["run"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    given = dict(line.split("=", 1) for line in output.read_text().splitlines())
    return proc.returncode, proc.stdout + proc.stderr, given.get("sha", "")


def test_cd_reload_checks_out_the_commit_of_the_running_image(host: Host) -> None:
    """A reload restarts the image that runs, so the workflow must use that image's commit
    (compose.yaml, scripts, evaluation), not the branch's head, which may be ahead of it."""
    deployed, head = "a" * 40, "b" * 40
    assert _cd_commit_step(host, "reload", head)[0] == 1  # nothing deployed yet: says so
    code, out = host("deploy", f"ghcr.io/o/catsdogs-serve:{deployed}")
    assert code == 0, out
    assert _cd_commit_step(host, "reload", head) == (
        0,
        f"reload: ghcr.io/o/catsdogs-serve:{deployed} runs now; "
        f"using the files of commit {deployed}\n",
        deployed,
    )
    code, _, sha = _cd_commit_step(host, "deploy", head)  # a deploy uses the commit it deploys
    assert (code, sha) == (0, head)
    code, out = host("deploy", "catsdogs-serve:local")  # an image not tagged by commit
    assert code == 0, out
    code, out, sha = _cd_commit_step(host, "reload", head)
    assert (code, sha) == (1, "")
    assert "not tagged with a commit sha" in out


def test_a_deployed_image_is_pinned_to_its_registry_digest(host: Host) -> None:
    """The tag a CD run deploys can be pushed again later; the image that passed the checks is
    started, recorded and rolled back to by its digest, and a reload still finds its commit."""
    sha, other = "c" * 40, "d" * 40
    digest, decoy = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    (host.run_dir / "digests").write_text(
        f"ghcr.io/o/catsdogs-serve-old@{decoy}\nghcr.io/o/catsdogs-serve@{digest}\n"
    )
    code, out = host("deploy", f"ghcr.io/o/catsdogs-serve:{sha}")
    assert code == 0, out
    pinned = f"ghcr.io/o/catsdogs-serve:{sha}@{digest}"
    assert host.running == f"{pinned} {uri(3)}"
    assert host.deployments() == [f"{pinned} 3"]
    assert (host.state / "current").read_text().strip() == pinned
    code, out, commit = _cd_commit_step(host, "reload", other)
    assert (code, commit) == (0, sha), out

    (host.run_dir / "digests").write_text("")  # a local build: no registry digest, kept a tag
    code, out = host("deploy", f"registry.local:5000/catsdogs-serve:{other}")
    assert code == 0, out
    assert host.running == f"registry.local:5000/catsdogs-serve:{other} {uri(3)}"
    code, out = host("rollback")
    assert code == 0, out
    assert host.running == f"{pinned} {uri(3)}"  # back to the digest that passed


def test_the_deployment_checks_post_no_labels_to_production(host: Host) -> None:
    """The same photos' labels, posted on every deployment, would pile up in production's live
    accuracy (and weigh down real users' feedback): the evaluation runs with FEEDBACK=0."""
    log = host.run_dir / "log"
    log.write_text("")
    code, out = host("deploy", "img:A")
    assert code == 0, out
    (evaluation,) = [line for line in log.read_text().splitlines() if "evaluate-deployment" in line]
    assert "FEEDBACK=0" in evaluation.split()


def test_make_evaluate_deployment_turns_feedback_0_into_no_feedback() -> None:
    """What the Makefile runs for FEEDBACK=0 (make -n: printed, not run)."""
    dry = subprocess.run(
        ["make", "-n", "--no-print-directory", "evaluate-deployment", "URL=http://x", "FEEDBACK=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = dry.stdout.replace("\\\n", " ").splitlines()  # a recipe's continued lines, joined
    (command,) = [line for line in lines if "monitoring.evaluate_deployment" in line]
    assert "--no-feedback" in command.split()
    default = subprocess.run(
        ["make", "-n", "--no-print-directory", "evaluate-deployment", "URL=http://x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "--no-feedback" not in default.stdout
