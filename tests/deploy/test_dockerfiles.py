"""The two images: hadolint, then what each Dockerfile must say, read with dockerfile-parse."""

from __future__ import annotations

import ast
import importlib.metadata
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.conftest import ROOT, tool

HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
_IMPORT_ERRORS = re.compile(r"\b(ImportError|ModuleNotFoundError)\b")


@dataclass(frozen=True)
class Image:
    dockerfile: str
    extra: str  # its extra in pyproject.toml
    package: str  # the process's package, copied into the build
    script: str  # its console script, the ENTRYPOINT
    other_package: str
    other_script: str


SIDECAR = Image(
    dockerfile="Dockerfile.sidecar",
    extra="sidecar",
    package="sidecar",
    script="kre-sidecar",
    other_package="handler_host",
    other_script="kre-handler-host",
)
HANDLER = Image(
    dockerfile="Dockerfile.handler-cuda",
    extra="handler",
    package="handler_host",
    script="kre-handler-host",
    other_package="sidecar",
    other_script="kre-sidecar",
)
IMAGES = {image.extra: image for image in (SIDECAR, HANDLER)}
DOCKERFILES = ["Dockerfile.sidecar", "Dockerfile.handler-cuda", "examples/torch/Dockerfile"]


def parse(dockerfile: str) -> DockerfileParser:
    # The parser reads its file lazily: give it the bytes, not a file that gets closed.
    return DockerfileParser(fileobj=io.BytesIO((ROOT / dockerfile).read_bytes()))


def final_stage(parser: DockerfileParser) -> list[dict]:
    structure = parser.structure
    last_from = max(i for i, s in enumerate(structure) if s["instruction"] == "FROM")
    return structure[last_from:]


def pip_lines(parser: DockerfileParser) -> list[str]:
    return [
        s["value"]
        for s in parser.structure
        if s["instruction"] == "RUN" and re.search(r"pip (install|wheel)", s["value"])
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint(dockerfile: str) -> None:
    command = [tool("hadolint"), "--config", str(HADOLINT_CONFIG), "--no-color"]
    command += ["--failure-threshold", "warning", str(ROOT / dockerfile)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == "", proc.stdout  # not even an info


@pytest.mark.parametrize("extra", IMAGES)
def test_non_root_user_and_entrypoint(extra: str, pyproject) -> None:
    image = IMAGES[extra]
    stage = final_stage(parse(image.dockerfile))
    users = [s["value"] for s in stage if s["instruction"] == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]}: numeric, not root"
    (entrypoint,) = [s["value"] for s in stage if s["instruction"] == "ENTRYPOINT"]
    assert json.loads(entrypoint) == [image.script]
    assert image.script in pyproject["project"]["scripts"]


@pytest.mark.parametrize("extra", IMAGES)
def test_malloc_arenas_as_deploy_local_runs_them(
    extra: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The benchmark's memory numbers come from deploy/local: it must run as the images do
    # (unless the caller's environment says otherwise, which is kept).
    from deploy.local.node import NodeConfig

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    image_env = parse(IMAGES[extra].dockerfile).envs
    local_env = NodeConfig("nats://x:1", "s", tmp_path, "h.py").env(tmp_path / "s", 1)
    assert image_env["MALLOC_ARENA_MAX"] == local_env["MALLOC_ARENA_MAX"] == "2"


def test_sidecar_base_is_a_pinned_python_slim() -> None:
    parser = parse(SIDECAR.dockerfile)
    for base in parser.parent_images:
        match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim(-\w+)?", base)
        assert match, f"{base}: expected a pinned python:X.Y.Z-slim tag"
        assert (int(match[1]), int(match[2])) >= (3, 11)


def test_handler_base_is_cuda_runtime_from_args() -> None:
    parser = parse(HANDLER.dockerfile)
    froms = [s["value"].split()[0] for s in parser.structure if s["instruction"] == "FROM"]
    expected = "nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}"
    assert froms and all(value == expected for value in froms), froms
    first_from = next(i for i, s in enumerate(parser.structure) if s["instruction"] == "FROM")
    # The ARGs before the first FROM are the ones the FROM lines can use.
    args = dict(
        s["value"].split("=", 1)
        for s in parser.structure[:first_from]
        if s["instruction"] == "ARG" and "=" in s["value"]
    )
    assert re.fullmatch(r"12\.\d+\.\d+", args["CUDA_VERSION"]), args["CUDA_VERSION"]
    assert args["UBUNTU_VERSION"] in ("22.04", "24.04")
    assert parser.baseimage == (
        f"nvidia/cuda:{args['CUDA_VERSION']}-runtime-ubuntu{args['UBUNTU_VERSION']}"
    )


@pytest.mark.parametrize("extra", IMAGES)
def test_each_image_installs_only_its_own_extra(extra: str, pyproject) -> None:
    image = IMAGES[extra]
    extras = pyproject["project"]["optional-dependencies"]
    assert image.extra in extras
    lines = pip_lines(parse(image.dockerfile))
    assert lines, "no pip install"
    for line in lines:
        named = {
            name.strip()
            for group in re.findall(r"\[([\w,\s-]+)\]", line)
            for name in group.split(",")
        }
        assert named == {image.extra}, f"{line!r} names the extras {named}"
        others = [name for name in extras if name != image.extra]
        assert not [name for name in others if f"[{name}" in line or f",{name}" in line]


@pytest.mark.parametrize("extra", IMAGES)
def test_the_other_process_is_left_out(extra: str) -> None:
    image = IMAGES[extra]
    parser = parse(image.dockerfile)
    copied = " ".join(s["value"] for s in parser.structure if s["instruction"] == "COPY")
    assert f"{image.package}/" in copied
    assert f"{image.other_package}/" not in copied, "the wheel would carry the other process"
    build = " ".join(pip_lines(parser))
    assert f"rm -f /opt/venv/bin/{image.other_script}" in build, "its dangling console script"
    assert f'-c "import {image.other_package}"' in build, "no build-time check it is absent"


def test_handler_image_has_no_nats_client(pyproject) -> None:
    build = " ".join(pip_lines(parse(HANDLER.dockerfile)))
    assert '-c "import nats"' in build
    extras = _closure(_requirements(pyproject["project"], HANDLER.extra))
    assert "nats-py" not in extras


def test_sidecar_uses_the_hosts_grpc_stack(pyproject) -> None:
    # One gRPC stack in the project: the sidecar's client is grpcio's, as the host's
    # server is; no pure-Python HTTP/2 client beside it.
    extras = _closure(_requirements(pyproject["project"], SIDECAR.extra))
    assert {"grpcio", "grpcio-health-checking"} <= extras
    assert not {"grpclib", "h2", "hyperframe"} & extras
    forbidden = {"grpclib", "h2", "hyperframe"}
    for path, module in _imports(SIDECAR.package):
        assert module.split(".")[0] not in forbidden, f"{path} imports {module}"


@pytest.mark.parametrize("extra", IMAGES)
def test_the_process_imports_nothing_of_the_other(extra: str) -> None:
    image = IMAGES[extra]
    forbidden = {image.other_package} | ({"nats"} if image is HANDLER else set())
    for path, module in _imports(image.package):
        assert module.split(".")[0] not in forbidden, f"{path} imports {module}"


@pytest.mark.parametrize("extra", IMAGES)
def test_the_extra_covers_every_import(extra: str, pyproject) -> None:
    # The image has the base dependencies and this extra, nothing else: each third-party
    # module the process imports must come from one of them (or their dependencies).
    image = IMAGES[extra]
    allowed = _closure(_requirements(pyproject["project"], image.extra))
    owners = importlib.metadata.packages_distributions()
    ours = {"sidecar", "handler_host", "protos"}
    missing = set()
    for path, module in _imports(image.package):
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top in ours:
            continue
        dists = {canonicalize_name(d) for d in owners.get(top, [])}
        if not dists & allowed:
            missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"not in kre-split-runner[{image.extra}]: {sorted(missing)}"


def _requirements(project: dict, extra: str) -> list[Requirement]:
    """What `pip install 'kre-split-runner[EXTRA]'` asks for, read from pyproject.toml."""
    wanted = project["dependencies"] + project["optional-dependencies"][extra]
    return [Requirement(r) for r in wanted]


def _closure(requirements: list[Requirement]) -> set[str]:
    seen: set[str] = set()
    todo = [r.name for r in requirements]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen or name == "kre-split-runner":
            continue
        seen.add(name)
        try:
            deps = [Requirement(r) for r in importlib.metadata.requires(name) or []]
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [d.name for d in deps if d.marker is None or d.marker.evaluate({"extra": ""})]
    return seen


def _imports(package: str) -> list[tuple[Path, str]]:
    """Absolute imports run when a package's modules load (not optional nor typing-only)."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        skipped = {id(node) for block in _optional_blocks(tree) for node in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                found += [(path, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((path, node.module))
    return found


def _optional_blocks(tree: ast.AST) -> list[ast.stmt]:
    """Statements under `try: ... except ImportError` or `if TYPE_CHECKING:`."""
    blocks: list[ast.stmt] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            h.type is not None and _IMPORT_ERRORS.search(ast.unparse(h.type)) for h in node.handlers
        ):
            blocks += node.body
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            blocks += node.body
    return blocks
