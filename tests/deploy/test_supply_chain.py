"""Dependencies you can trust: pins, hashed locks, pinned actions and base images, Dependabot, SBOM.

requirements/pins.in chooses every version once; requirements/<env>.in names each environment's
packages; ``make lock`` compiles them into the hashed lock files requirements-<env>.txt, which
every pip install (Makefile, Dockerfiles, workflows) uses with --require-hashes. Workflows use
actions by commit SHA, the Dockerfiles their base image by digest, Dependabot proposes updates of
all three, both images carry OCI labels, and ``make sbom`` describes the serving environment as a
CycloneDX SBOM (reports/sbom/serve.cdx.json, made before this suite by ``make test-deploy``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import ROOT

REQUIREMENTS = ROOT / "requirements"
PINS = REQUIREMENTS / "pins.in"
# environment -> the lock file it compiles to; the serve-test and dev locks are resolved against
# the serve and train locks (the environments they are installed with or over)
ENVIRONMENTS = {
    env: ROOT / f"requirements-{env}.txt"
    for env in ("serve", "serve-test", "train", "dev", "load", "tools")
}
LAYERED_ON = {"serve-test": "serve", "dev": "train"}
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
DOCKERFILES = [ROOT / "Dockerfile.serve", ROOT / "Dockerfile.train"]
SBOM = ROOT / "reports" / "sbom" / "serve.cdx.json"
TOOLS_PYTHON = ROOT / ".venv-tools" / "bin" / "python"
RELOCK = "edit requirements/*.in or requirements/pins.in, then run: make lock"

SHA256 = re.compile(r"--hash=sha256:[0-9a-f]{64}")
REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?(?P<spec>.*)$")


def norm(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Locked:
    version: str
    hashes: list[str]
    via: list[str] = field(default_factory=list)


def parse_lock(path: Path) -> dict[str, Locked]:
    """A pip-compile lock file: name -> version, hashes and the `# via` sources."""
    entries: dict[str, Locked] = {}
    current: Locked | None = None
    logical = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            if current is not None:
                text = stripped.lstrip("#").strip()
                text = text.removeprefix("via").strip()
                if text:
                    current.via.append(text)
            continue
        if not stripped:
            continue
        logical += stripped.removesuffix("\\").strip() + " "
        if stripped.endswith("\\"):
            continue
        requirement, *options = logical.split()
        logical = ""
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", requirement)
        assert match, f"{path.name}: {requirement!r} is not name==version ({RELOCK})"
        bad = [o for o in options if not SHA256.fullmatch(o)]
        assert not bad, f"{path.name}: {requirement}: unexpected options {bad}"
        current = Locked(version=match.group(2), hashes=options)
        name = norm(match.group(1))
        assert name not in entries, f"{path.name}: {name} locked twice"
        entries[name] = current
    return entries


def parse_in(path: Path) -> tuple[list[str], list[str]]:
    """An .in file: the names it asks for (extras dropped) and its -c constraint files."""
    names, constraints = [], []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-c "):
            constraints.append(line[3:].strip())
            continue
        assert not line.startswith("-"), f"{path.name}: unexpected option {line!r}"
        match = REQUIREMENT.match(line)
        assert match, f"{path.name}: cannot read {line!r}"
        assert not match.group("spec").strip(), (
            f"{path.name}: {line!r} carries a version; versions live in requirements/pins.in only"
        )
        names.append(norm(match.group("name")))
    return names, constraints


def parse_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in PINS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert match, f"pins.in: {line!r} is not name==version (no extras, no ranges)"
        name = norm(match.group(1))
        assert name not in pins, f"pins.in: {name} is pinned twice"
        pins[name] = match.group(2)
    return pins


@pytest.fixture(scope="module")
def locks() -> dict[str, dict[str, Locked]]:
    return {env: parse_lock(path) for env, path in ENVIRONMENTS.items()}


# ---------------------------------------------------------------- pins and locks


def test_each_environment_has_an_input_and_a_lock() -> None:
    inputs = {p.stem for p in REQUIREMENTS.glob("*.in")} - {"pins"}
    assert inputs == set(ENVIRONMENTS)
    locks_here = {p.name for p in ROOT.glob("requirements*.txt")}
    assert locks_here == {p.name for p in ENVIRONMENTS.values()}


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_lock_entry_is_pinned_and_hashed(
    env: str, locks: dict[str, dict[str, Locked]]
) -> None:
    lock = locks[env]
    assert lock, f"{ENVIRONMENTS[env].name} locks nothing"
    for name, entry in lock.items():
        assert entry.hashes, f"{ENVIRONMENTS[env].name}: {name} has no --hash"


def test_each_version_is_pinned_in_one_place(locks: dict[str, dict[str, Locked]]) -> None:
    pins = parse_pins()  # asserts: every line name==version, no name twice
    for env in ENVIRONMENTS:
        names, constraints = parse_in(REQUIREMENTS / f"{env}.in")  # asserts: no versions there
        assert "pins.in" in constraints, f"{env}.in does not read pins.in (-c pins.in)"
        unpinned = set(names) - set(pins)
        assert not unpinned, f"{env}.in names {sorted(unpinned)} without a pin in pins.in"
    locked = set().union(*(lock.keys() for lock in locks.values()))
    stale = set(pins) - locked
    assert not stale, f"pins.in pins {sorted(stale)}, which no lock holds: drop them"


def test_no_version_is_pinned_outside_pins_and_locks() -> None:
    """A `pkg==1.2` in a Dockerfile, workflow, Makefile or script would be a second place."""
    files = [*DOCKERFILES, *WORKFLOWS, ROOT / "Makefile", ROOT / ".ci" / "run"]
    files += sorted((ROOT / "scripts").glob("*.sh"))
    pinned = re.compile(r"\bpip3? install\b[^\n]*\b[A-Za-z0-9._-]+(\[[^\]]*\])?==\d")
    offenders = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in files
        for line in path.read_text().splitlines()
        if pinned.search(line)
    ]
    assert not offenders


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_lock_matches_its_input(env: str, locks: dict[str, dict[str, Locked]]) -> None:
    lock_path = ENVIRONMENTS[env]
    header = lock_path.read_text().split("\n\n", 1)[0]
    # the command that made it, which `make lock` and Dependabot run again
    output = re.escape(lock_path.name)
    command = rf"^#\s+pip-compile .*--output-file={output}(?: .*)? requirements/{env}\.in$"
    assert re.search(command, header, re.M), (
        f"{lock_path.name} was not compiled from requirements/{env}.in; {RELOCK}"
    )
    for option in ("--generate-hashes", "--allow-unsafe", "--no-emit-index-url"):
        assert option in header, f"{lock_path.name} was compiled without {option}"

    names, _ = parse_in(REQUIREMENTS / f"{env}.in")
    lock = locks[env]
    source = f"-r requirements/{env}.in"
    top_level = {name for name, entry in lock.items() if source in entry.via}
    assert top_level == set(names), (
        f"{lock_path.name} is stale: the input names {sorted(set(names) - top_level)} "
        f"that it does not, and it holds {sorted(top_level - set(names))} that the input "
        f"dropped; {RELOCK}"
    )
    pins = parse_pins()
    wrong = {
        name: (entry.version, pins[name])
        for name, entry in lock.items()
        if name in pins and entry.version != pins[name]
    }
    assert not wrong, f"{lock_path.name}: locked != pinned {wrong}; {RELOCK}"


@pytest.mark.parametrize(("env", "base"), LAYERED_ON.items())
def test_layered_lock_agrees_with_the_lock_it_is_installed_with(
    env: str, base: str, locks: dict[str, dict[str, Locked]]
) -> None:
    _, constraints = parse_in(REQUIREMENTS / f"{env}.in")
    assert f"../{ENVIRONMENTS[base].name}" in constraints
    shared = locks[env].keys() & locks[base].keys()
    assert shared, f"{env} and {base} share nothing: is the constraint still needed?"
    differ = {
        name: (locks[env][name].version, locks[base][name].version)
        for name in shared
        if locks[env][name].version != locks[base][name].version
    }
    assert not differ, f"{env} and {base} lock different versions: {differ}; {RELOCK}"


def test_serving_lock_has_no_training_or_test_stack(locks: dict[str, dict[str, Locked]]) -> None:
    banned = {"torch", "torchvision", "mlflow", "dvc", "pytest", "onnx", "locust"}
    assert not banned & locks["serve"].keys()


def test_every_pip_install_requires_hashes_from_a_lock() -> None:
    installs: list[tuple[str, str]] = []
    for path in [*DOCKERFILES, *WORKFLOWS, ROOT / ".ci" / "run", ROOT / "Makefile"]:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if line.lstrip().startswith("#") or "PIP_INSTALL =" in line:
                continue
            if re.search(r"\bpip3? install\b|\$\(PIP_INSTALL\)", line):
                installs.append((str(path.relative_to(ROOT)), line.strip()))
    assert len(installs) >= 9, installs  # each venv, the SBOM venv, both images, CI's lint job
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^PIP_INSTALL = -m pip install -q --require-hashes$", makefile, re.M)
    for where, line in installs:
        assert "--require-hashes" in line or "$(PIP_INSTALL)" in line, f"{where}: {line}"
        files = re.findall(r"-r\s+(\S+)", line)
        assert files, f"{where}: installs something other than a lock file: {line}"
        for name in files:
            assert Path(name).name in {p.name for p in ENVIRONMENTS.values()}, f"{where}: {line}"


def test_pip_refuses_a_file_whose_hash_is_not_in_the_lock(
    locks: dict[str, dict[str, Locked]], tmp_path: Path
) -> None:
    """The enforcement itself: pip installs a locked package, and refuses it with a wrong hash."""
    entry = locks["serve"]["idna"]
    good = tmp_path / "good.txt"
    good.write_text(f"idna=={entry.version} " + " ".join(entry.hashes) + "\n")
    bad = tmp_path / "bad.txt"
    bad.write_text(f"idna=={entry.version} --hash=sha256:{'0' * 64}\n")

    def install(req: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--require-hashes",
             "--no-cache-dir", "--target", str(tmp_path / req.stem), "-r", str(req)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip

    ok = install(good)
    assert ok.returncode == 0, ok.stderr[-2000:]
    refused = install(bad)
    assert refused.returncode != 0
    assert "DO NOT MATCH THE HASHES" in refused.stderr


# ---------------------------------------------------------------- actions, images, Dependabot


def test_actions_are_pinned_by_commit_sha() -> None:
    uses_line = re.compile(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$")
    seen = 0
    for path in WORKFLOWS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            match = uses_line.match(line)
            if not match:
                continue
            seen += 1
            ref, rest = match.groups()
            where = f"{path.name}:{number}: {line.strip()}"
            if ref.startswith("./"):
                continue
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), f"not a commit SHA: {where}"
            assert re.fullmatch(r"\s+# v\d+\.\d+\.\d+\s*", rest), f"no `# vX.Y.Z` comment: {where}"
    assert seen >= 10


def test_same_action_same_sha_everywhere() -> None:
    refs: dict[str, set[str]] = {}
    for path in WORKFLOWS:
        for action, sha in re.findall(
            r"uses:\s*([\w.-]+/[\w./-]+)@([0-9a-f]{40})", path.read_text()
        ):
            refs.setdefault(action, set()).add(sha)
    assert refs
    assert all(len(shas) == 1 for shas in refs.values()), refs


def dockerfile_froms(path: Path) -> list[tuple[str, str | None]]:
    """(image, stage name) of each FROM instruction."""
    froms = []
    for line in path.read_text().splitlines():
        match = re.match(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?\s*$", line, re.I)
        if match:
            froms.append((match.group(1), match.group(2)))
    return froms


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_by_digest(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    stages: set[str] = set()
    froms = dockerfile_froms(dockerfile)
    assert froms
    for image, stage in froms:
        if image not in stages:
            # name:tag@sha256:digest: the tag says what the digest was taken from
            assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), (
                f"{dockerfile.name}: FROM {image} is not pinned by digest (with its tag)"
            )
        if stage:
            stages.add(stage)
    # no base image through a build argument (Dependabot reads FROM lines only), and no
    # frontend image fetched by a `# syntax=` line
    assert "${" not in "".join(image for image, _ in froms)
    assert not re.search(r"^#\s*syntax=", text, re.M)


def test_both_images_start_from_the_same_base_and_the_build_knows_it() -> None:
    bases = {image for path in DOCKERFILES for image, _ in dockerfile_froms(path) if "@" in image}
    assert len(bases) == 1, bases
    (base,) = bases
    # scripts/containers.sh reads the pinned reference from Dockerfile.serve for the offline
    # stand-in (--build-context): the same expression must find it
    script = (ROOT / "scripts" / "containers.sh").read_text()
    assert "grep --max-count=1 -oE '^FROM [^ ]+@sha256:[0-9a-f]{64}' Dockerfile.serve" in script
    assert f"FROM {base}" in (ROOT / "Dockerfile.serve").read_text()


def test_dependabot_covers_pip_actions_and_docker() -> None:
    config = yaml.safe_load((ROOT / ".github" / "dependabot.yml").read_text())
    assert config["version"] == 2
    updates = {u["package-ecosystem"]: u for u in config["updates"]}
    assert {"pip", "github-actions", "docker"} <= updates.keys()
    for update in updates.values():
        directories = update.get("directories") or [update.get("directory")]
        assert "/" in directories, update
        assert update["schedule"]["interval"]
    # pip at the root: Dependabot reads the root's requirements*.txt and the requirements/
    # folder, and takes a lock for pip-compile output of an .in when its header names it so
    for path in ENVIRONMENTS.values():
        assert re.search(rf"--output-file[=\s]+{re.escape(path.name)}(?:\s|$)", path.read_text())
    # torch/torchvision come from a local index on the project's machines: bumped by hand
    ignored = {i["dependency-name"] for i in updates["pip"].get("ignore", [])}
    assert {"torch", "torchvision"} <= ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_carry_oci_labels_from_build_args(dockerfile: Path) -> None:
    text = dockerfile.read_text().replace("\\\n", " ")
    final_stage = re.split(r"^FROM ", text, flags=re.M)[-1]
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', final_stage))
    args = set(re.findall(r"^ARG (\w+)", final_stage, re.M))
    for key, arg in {
        "source": "IMAGE_SOURCE",
        "revision": "GIT_COMMIT",
        "version": "IMAGE_VERSION",
    }.items():
        assert labels.get(f"org.opencontainers.image.{key}") == f"${{{arg}}}", (
            dockerfile.name,
            key,
        )
        assert arg in args, f"{dockerfile.name}: ARG {arg} is not declared in the final stage"
    assert labels["org.opencontainers.image.title"].startswith("catsdogs-")
    script = (ROOT / "scripts" / "containers.sh").read_text()
    for arg in ("IMAGE_SOURCE", "GIT_COMMIT", "IMAGE_VERSION"):
        assert f"--build-arg {arg}=" in script, f"scripts/containers.sh does not pass {arg}"


# ---------------------------------------------------------------- SBOM


@pytest.fixture(scope="module")
def sbom() -> dict:
    assert SBOM.is_file(), f"{SBOM.relative_to(ROOT)} is missing: run make sbom"
    return json.loads(SBOM.read_text())


def test_sbom_is_valid_cyclonedx(sbom: dict) -> None:
    assert sbom["bomFormat"] == "CycloneDX"
    assert sbom["specVersion"] == "1.6"
    assert sbom["metadata"]["component"]["name"] == "catsdogs"
    # validated against the CycloneDX 1.6 JSON schema by cyclonedx-python-lib (the tools venv
    # that made it; make sbom builds that venv first)
    assert TOOLS_PYTHON.exists(), "no .venv-tools: run make sbom"
    check = (
        "import sys; from cyclonedx.schema import SchemaVersion;"
        "from cyclonedx.validation.json import JsonStrictValidator;"
        "error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(open(sys.argv[1]).read());"
        "sys.exit(str(error) if error else 0)"
    )
    result = subprocess.run(
        [str(TOOLS_PYTHON), "-c", check, str(SBOM)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_sbom_lists_exactly_the_serving_lock(
    sbom: dict, locks: dict[str, dict[str, Locked]]
) -> None:
    components = {norm(c["name"]): c for c in sbom["components"]}
    for name, component in components.items():
        assert component["type"] == "library"
        assert component["purl"] == f"pkg:pypi/{name}@{component['version']}"
    in_sbom = {name: c["version"] for name, c in components.items()}
    in_lock = {name: entry.version for name, entry in locks["serve"].items()}
    assert in_sbom == in_lock, f"stale SBOM or lock: make sbom (after {RELOCK})"
    for name in ("onnxruntime", "starlette", "uvicorn", "numpy", "pillow"):
        assert in_sbom[name] == parse_pins()[name]
    assert not {"torch", "torchvision", "mlflow", "dvc", "pip", "setuptools"} & in_sbom.keys()
