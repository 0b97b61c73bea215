"""How a cross-validated configuration's figures are printed, the same in every report.

``make cv`` writes them in ``reports/cv`` (``training/cv.py``) and the cost stage in
``reports/cost`` (``export/cost.py``); both take an entry of ``reports/cv/summary.json``.
"""

from __future__ import annotations

from typing import Any


def accuracy_text(s: dict[str, Any]) -> str:
    """``0.9932 (0.9901-0.9953)``: the accuracy and its 95% interval."""
    return f"{s['accuracy']:.4f} ({s['ci95'][0]:.4f}-{s['ci95'][1]:.4f})"


def mistakes_text(s: dict[str, Any]) -> str:
    """``26.3 ± 2.1 (24-29) / 3991``: the mean over the repeats, its spread and range; one
    repeat prints its count alone (``26 / 3991``)."""
    per = s["mistakes_per_repeat"]
    if len(per) == 1:
        return f"{per[0]} / {s['n']}"
    return f"{s['mistakes']:.1f} ± {s['mistakes_sd']:.1f} ({min(per)}-{max(per)}) / {s['n']}"


def cascade_text(s: dict[str, Any]) -> str:
    """The first model, the probability under which the second answers instead, and the share
    of photos it answered: ``lite0`` below 0.9 ``lite0+lite2`` (2.1%), in Markdown."""
    return f"`{s['first']}`, below {s['below']:g} `{s['then']}` ({s['escalated'] * 100:.1f}%)"


def row_label(name: str, s: dict[str, Any], default_tag: str = "") -> str:
    """A table row's first cell: the name, then the default's tag, an ensemble's members or a
    cascade's steps."""
    if "members" in s:
        return f"`{name}` = " + " + ".join(f"`{m}`" for m in s["members"])
    if "first" in s:
        return f"`{name}` = {cascade_text(s)}"
    return f"`{name}`{default_tag}"


def arch_key(served: dict[str, Any]) -> str:
    """``model@input``, or ``model@input>network`` with an in-graph resize: one served arch."""
    key = f"{served['model']}@{served['input_size']}"
    return f"{key}>{served['network_size']}" if served.get("network_size") else key


def parse_arch(key: str) -> dict[str, Any]:
    """The inverse of :func:`arch_key`."""
    model, sizes = key.split("@")
    input_size, _, network = sizes.partition(">")
    served: dict[str, Any] = {"model": model, "input_size": int(input_size)}
    if network:
        served["network_size"] = int(network)
    return served
