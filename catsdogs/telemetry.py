"""Usage telemetry of the libraries the project runs on: off unless a deployment turns it on.

onnxruntime 1.32's official Linux wheels report to Microsoft (a 1DS uploader, started when
``onnxruntime`` is imported: a device id and a cache of events under ``~/.cache/Microsoft``, a
warning at every start on a read-only root), MLflow 3 fetches a telemetry configuration and
reports usage, and DVC reports usage analytics. A serving process that calls home, or a
training run that reaches the Internet for anything but its data, is not what a deployment
expects: the network policy may block it, and nothing here needs it.

:func:`opt_out` sets each library's documented opt-out, but only where the environment does
not say otherwise (``ORT_DISABLE_TELEMETRY=0`` turns onnxruntime's back on). The packages that
run as programs (``server``, ``training``, ``export``, ``loadtest``, ``monitoring``) call it
first thing in their ``__init__``, before any of their modules imports the library, since
onnxruntime reads its setting once, at import; the Makefile and both images set the same.
"""

from __future__ import annotations

import os

OPT_OUTS = (
    ("ORT_DISABLE_TELEMETRY", "1"),
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("DVC_NO_ANALYTICS", "1"),
)
# Variables under which onnxruntime and MLflow keep quiet by themselves (CI services and pytest
# set one): the tests remove them, with OPT_OUTS, to see what a deployment's process does.
CI_MARKERS = frozenset(
    {"CI", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TF_BUILD", "JENKINS_URL", "TRAVIS"}
    | {"PYTEST_CURRENT_TEST"}
)


def opt_out() -> None:
    """Each library's telemetry off, where the environment leaves it unset."""
    for name, value in OPT_OUTS:
        os.environ.setdefault(name, value)
