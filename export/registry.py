"""Model registry commands: ``python -m export.registry promote --version N``.

``promote`` points an alias (default ``champion``) at a registered version; the server serves it
with ``MODEL_URI=models:/catsdogs@champion``. ``list`` shows the versions and their aliases.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from export.params import load_export
from export.tracking import tracking_uri

log = logging.getLogger("export.registry")


def promote(name: str, version: str, alias: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri())
    client.get_model_version(name, version)  # fails clearly if the version does not exist
    client.set_registered_model_alias(name, alias, version)
    log.info("%s@%s -> version %s (%s)", name, alias, version, tracking_uri())


def list_versions(name: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri())
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    for mv in client.search_model_versions(f"name='{name}'"):
        acc = mv.tags.get("test_accuracy", "?")
        tags = ",".join(aliases.get(str(mv.version), []))
        log.info(
            "version %s  accuracy %s  data %s  %s",
            mv.version,
            acc,
            mv.tags.get("data_version", "?")[:8],
            tags,
        )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m export.registry", description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--name", help="registered model name (default: export.registered_model)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("promote", help="point an alias at a version")
    p.add_argument("--version", required=True)
    p.add_argument("--alias", default="champion")
    sub.add_parser("list", help="list versions")
    args = parser.parse_args(argv)
    name = args.name or load_export(args.params).registered_model
    if args.command == "promote":
        promote(name, args.version, args.alias)
    else:
        list_versions(name)


if __name__ == "__main__":
    main()
