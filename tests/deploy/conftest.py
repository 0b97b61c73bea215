"""Fixtures of the deployment suite: every kustomization under deploy/k8s rendered once, offline.

The prod overlay needs its git-ignored ``secrets.env``: the tree is rendered from a temporary
copy that gets the example file in its place, filled in as its comments ask (the server refuses
the example's placeholder token). A missing ``kubectl`` fails the suite (no skip):
the manifests would otherwise go unchecked.
"""

from __future__ import annotations

import secrets
import shutil

import pytest

from tests.deploy.manifests import K8S, KUSTOMIZATIONS, Manifest, render


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Manifest]]:
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree)
    prod = tree / "overlays" / "prod"
    example = (prod / "secrets.env.example").read_text()
    assert "API_TOKEN=replace-with-a-long-random-token" in example
    filled = example.replace("replace-with-a-long-random-token", secrets.token_urlsafe(32))
    (prod / "secrets.env").write_text(filled)
    return {name: render(tree / path) for name, path in KUSTOMIZATIONS.items()}
