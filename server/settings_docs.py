"""The server's settings as documentation: ``--help`` lines and the README's table.

Both are made from the fields of :class:`server.settings.Settings` (name, type, default and the
``help`` of each field), so a new setting is documented once, where it is declared.

    python -m server.settings_docs                  # print the Markdown table
    python -m server.settings_docs --write README.md  # rewrite the block between the markers
    python -m server.settings_docs --check README.md  # exit 1 if that block is out of date
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import NamedTuple

from server.settings import _SECRETS, Settings

START = "<!-- settings:start -->"
END = "<!-- settings:end -->"
KIB = 1024
# short forms kept from the first CLI; documented next to the generated flag
ALIASES = {"model_path": ("--model",)}


class SettingDoc(NamedTuple):
    name: str  # the field, e.g. max_batch_size
    env: str  # its environment variable, MAX_BATCH_SIZE
    flags: tuple[str, ...]  # its command-line flags, (--max-batch-size,); none for secrets
    kind: str  # int, float or str
    default: str  # as shown; empty for an empty string and for every secret
    note: str  # the default in a unit people read (10 MiB), or empty
    help: str


def shown_default(name: str, value: object) -> str:
    """The default as an operator would type it; empty for an empty string and every secret."""
    return "" if name in _SECRETS or value == "" else str(value)


def size_note(name: str, value: object) -> str:
    """``10 MiB`` beside a byte size of 10485760, else empty."""
    if isinstance(value, int) and name.endswith("_bytes") and value >= KIB:
        for unit, size in (("GiB", KIB**3), ("MiB", KIB**2), ("KiB", KIB)):
            if value % size == 0:
                return f"{value // size} {unit}"
    return ""


def setting_docs() -> list[SettingDoc]:
    """Every field of :class:`Settings`, in declaration order."""
    docs = []
    for f in dataclasses.fields(Settings):
        secret = f.name in _SECRETS
        default = f.default
        if default is dataclasses.MISSING:  # a field with a default_factory
            default = f.default_factory()
        docs.append(
            SettingDoc(
                name=f.name,
                env=f.name.upper(),
                # a secret on a command line is visible to every local user (ps, /proc)
                flags=() if secret else ("--" + f.name.replace("_", "-"), *ALIASES.get(f.name, ())),
                kind=str(f.type),
                default=shown_default(f.name, default),
                note="" if secret else size_note(f.name, default),
                help=f.metadata.get("help", ""),
            )
        )
    return docs


def help_line(doc: SettingDoc) -> str:
    """``DESCRIPTION (env NAME, default X)``, the text of the flag in ``--help``."""
    default = doc.default or "empty"
    note = f" = {doc.note}" if doc.note else ""
    return f"{doc.help} (env {doc.env}, default {default}{note})"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The Markdown table of every setting: setting, environment variable, default, description."""
    lines = ["| setting | environment variable | default | description |", "|---|---|---|---|"]
    for d in setting_docs():
        flag = ", ".join(f"`{f}`" for f in d.flags) or "(environment only)"
        default = f"`{d.default}`" if d.default else "empty"
        default += f" ({d.note})" if d.note else ""
        lines.append(f"| {flag} | `{d.env}` | {default} | {_cell(d.help)} |")
    return "\n".join(lines) + "\n"


def replace_block(text: str, table: str) -> str:
    """``text`` with everything between the markers replaced by ``table``."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected one {START} ... {END} block")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.settings_docs", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="FILE", help="rewrite FILE's settings block")
    group.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if FILE's block differs")
    args = parser.parse_args(argv)
    table = markdown_table()
    path = args.write or args.check
    if path is None:
        sys.stdout.write(table)
        return 0
    text = path.read_text()
    wanted = replace_block(text, table)
    if args.check:
        if wanted != text:
            print(f"{path}: the settings table is out of date; run `make docs-settings`")
            return 1
        return 0
    if wanted != text:
        path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
