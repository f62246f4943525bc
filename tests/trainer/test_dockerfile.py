"""The trainer image definition: entrypoint, user and what it installs."""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "trainer_image" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def last(keyword: str) -> str:
    return [rest for key, rest in instructions() if key == keyword][-1]


def args() -> dict[str, str]:
    return dict(rest.split("=", 1) for key, rest in instructions() if key == "ARG" and "=" in rest)


def test_entrypoint_is_the_importable_trainer_module():
    entrypoint = json.loads(last("ENTRYPOINT"))  # exec form: signals reach the launcher
    assert entrypoint == ["python", "-m", "sftjob_trainer"]
    assert importlib.util.find_spec("sftjob_trainer.__main__") is not None
    assert importlib.util.find_spec("sftjob_trainer.worker") is not None


def test_runs_as_non_root():
    user = last("USER")
    resolved = re.sub(r"\$\{?(\w+)\}?", lambda m: args().get(m.group(1), m.group(0)), user)
    assert resolved not in ("root", "0") and resolved.isdigit() and int(resolved) > 0


def test_installs_only_the_trainer_and_gpu_extras_with_matching_torch():
    runs = [rest for key, rest in instructions() if key == "RUN" and "pip install" in rest]
    assert len(runs) == 1
    extras = re.findall(r'"\.\[([^\]]+)\]"', runs[0])
    assert extras == ["trainer,gpu"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    trainer = project["optional-dependencies"]["trainer"]
    assert "kopf" not in " ".join(trainer)  # the trainer never imports the operator's framework
    torch_pin = next(d for d in trainer if d.startswith("torch=="))
    assert torch_pin == f"torch=={args()['PYTORCH_VERSION']}"
    assert last("FROM").startswith("pytorch/pytorch:${PYTORCH_VERSION}-")


def test_the_image_ships_no_bench_tool():
    """What `pip install .` finds in the image's copy of the repository: no measurement tools.

    The copy is rebuilt from the Dockerfile's COPY lines, and the packages are found with
    pyproject's own [tool.setuptools.packages.find] settings, as pip's build would.
    """
    from setuptools import find_packages

    copied = [rest.split()[0] for key, rest in instructions() if key == "COPY"]
    finder = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    finder = finder["packages"]["find"]
    shipped: set[str] = set()
    for where in finder["where"]:
        present = [c for c in copied if c == where or c.startswith(f"{where}/")]
        for package in find_packages(str(REPO / where), include=finder["include"]):
            path = f"{where}/{package.replace('.', '/')}"
            if any(path == c or path.startswith(f"{c}/") or c == where for c in present):
                shipped.add(package)
    assert "sftjob_trainer" in shipped
    assert not any(p.startswith("sftjob_bench") for p in shipped), shipped
    modules = {f.stem for f in (REPO / "trainer_image" / "sftjob_trainer").glob("*.py")}
    assert not modules & {"bench", "bench_report", "gpu_check"}
    assert importlib.util.find_spec("sftjob_bench.bench") is not None  # still there for dev


# The libraries the trainer and its speed levers rely on: the image must hold exactly the
# versions the levers were verified with (levers/contract.py), never whatever pip resolves.
TRAINER_LIBRARIES = ("torch", "transformers", "trl", "datasets", "accelerate", "peft")


def constraint_pins() -> dict[str, str]:
    """constraints.txt as {normalised name: exact version}; every line must be `name==version`."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"constraints.txt: {line!r} is not an exact pin"
        pins[canonicalize_name(name)] = version
    return pins


def test_the_image_installs_at_the_constraints_versions():
    (run,) = [rest for key, rest in instructions() if key == "RUN" and "pip install" in rest]
    assert re.search(r"(-c|--constraint)\s+constraints\.txt\b", run), run
    copied = [rest.split() for key, rest in instructions() if key == "COPY"]
    before_install = instructions().index(("RUN", run))
    copies_before = [rest.split() for key, rest in instructions()[:before_install] if key == "COPY"]
    assert any("constraints.txt" in words[:-1] for words in copies_before), copied


def test_constraints_pin_the_trainer_libraries_within_pyproject():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = constraint_pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    trainer = {
        canonicalize_name(req.name): req
        for req in map(Requirement, project["optional-dependencies"]["trainer"])
    }
    for library in TRAINER_LIBRARIES:
        assert library in pins, f"constraints.txt does not pin {library}"
        assert library in trainer, f"pyproject's trainer extra does not name {library}"
        assert Version(pins[library]) in trainer[library].specifier, (library, pins[library])
    assert pins["torch"] == args()["PYTORCH_VERSION"]
    assert pins["trl"] == "1.16.0" and pins["torch"] == "2.13.0"


def test_the_pinned_versions_are_the_ones_the_levers_were_verified_with():
    """Every lever's declared range holds the pinned version of each library it names."""
    from packaging.version import Version
    from sftjob_trainer.speed import LEVERS

    pins = constraint_pins()
    for lever in LEVERS:
        assert lever.CONTRACT.versions, lever.SWITCH
        for library, verified in lever.CONTRACT.versions.items():
            assert Version(pins[library]) in verified, (lever.SWITCH, library, verified)


def test_the_gpu_extra_is_liger_at_its_pin_and_stays_out_of_the_ci_install():
    """The image's GPU-only kernels: liger-kernel, pinned, checked at build, never in CI.

    Liger's kernels are Triton GPU kernels (the ligerKernel lever turns them on under auto
    where they import and the model is not compiled); Triton comes with the base image's
    CUDA torch. CI's CPU install (the Makefile's extras) must not pull Triton for them.
    """
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    gpu = [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    assert [r.name for r in gpu] == ["liger-kernel"]
    assert str(gpu[0].specifier) == f"=={constraint_pins()['liger-kernel']}"
    (run,) = [rest for key, rest in instructions() if key == "RUN" and "pip install" in rest]
    imported = re.search(r'python -c "import ([^"]+)"', run)
    assert imported and "liger_kernel" in [m.strip() for m in imported.group(1).split(",")]
    makefile = (REPO / "Makefile").read_text()
    installs = re.findall(r"pip install[^\n]*'\.\[([^\]]+)\]'", makefile)
    assert installs and all("gpu" not in extras.split(",") for extras in installs), installs
