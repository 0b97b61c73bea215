"""Fixtures of the deployment suite: every kustomization under deploy/k8s rendered once, offline.

The prod overlay needs its git-ignored ``secrets.env``: the tree is rendered from a temporary
copy that gets the example file in its place. A missing ``kubectl`` fails the suite (no skip):
the manifests would otherwise go unchecked.
"""

from __future__ import annotations

import shutil

import pytest

from tests.deploy.manifests import K8S, KUSTOMIZATIONS, Manifest, render


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Manifest]]:
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree)
    prod = tree / "overlays" / "prod"
    shutil.copyfile(prod / "secrets.env.example", prod / "secrets.env")
    return {name: render(tree / path) for name, path in KUSTOMIZATIONS.items()}
