"""Rendering the kustomize overlays, as `kubectl apply -k` would, for the deploy tests.

The render is our own small Go program over kustomize's library (tools/kustomize), which
`make` builds into the venv: a fresh machine has Go and its module proxy, but no kubectl new
enough for kustomize components."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
COMPONENTS = ("redis-url", "redis-sentinel", "redis-cluster")
#: Built by `make` (the Makefile's .venv/bin/aqsh-kustomize target); AQSH_KUSTOMIZE points
#: elsewhere, e.g. at another build of the same program.
KUSTOMIZE = Path(os.environ.get("AQSH_KUSTOMIZE") or ROOT / ".venv" / "bin" / "aqsh-kustomize")


def _kustomize_binary() -> Path:
    # A missing renderer fails rather than skips: rendering is what these tests prove, and a
    # skip would let a broken overlay through unnoticed.
    if not KUSTOMIZE.is_file():
        pytest.fail(f"{KUSTOMIZE} is missing: run `make kustomize` (needs Go; `make test` does it) "
                    "to build the kustomize renderer the deploy tests use", pytrace=False)
    return KUSTOMIZE


@functools.cache
def _kustomize_text(directory: Path) -> str:
    result = subprocess.run([str(_kustomize_binary()), str(directory)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, f"aqsh-kustomize {directory}: {result.stderr}"
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
