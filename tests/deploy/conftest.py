"""Rendering the kustomize overlays, as `kubectl apply -k` would, for the deploy tests."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
COMPONENTS = ("redis-url", "redis-sentinel", "redis-cluster")
#: kustomize is built into kubectl; the test environment has it here (a missing kubectl
#: fails the tests: rendering is what they prove).
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"


@functools.cache
def _kustomize_text(directory: Path) -> str:
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    return result.stdout


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The rendered objects, fresh each call (tests may change them); rendered once a run."""
    docs = [doc for doc in yaml.safe_load_all(_kustomize_text(directory)) if doc]
    assert docs, f"{directory} rendered nothing"
    return docs


def render_overlay(name: str) -> list[dict[str, Any]]:
    return kustomize(K8S / "overlays" / name)


def render_with_component(component: str, tmp_path: Path) -> list[dict[str, Any]]:
    """The base with one Redis component, as the prod overlay uses them (kustomize takes only
    relative paths, so the kustomization points back into the repository)."""
    here = tmp_path / f"with-{component}"
    here.mkdir()
    base = os.path.relpath(K8S / "base", here)
    comp = os.path.relpath(K8S / "components" / component, here)
    (here / "kustomization.yaml").write_text(
        f"resources: [{base}]\ncomponents: [{comp}]\nnamespace: aqsh\n")
    return kustomize(here)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}
