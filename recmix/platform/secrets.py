"""Keep secret values out of everything recmix writes or prints (metrics, manifests, summaries, logs).

Credentials reach recmix through the environment only: the driver's, and on every Ray node the node's own
(a local cluster inherits the driver's environment when it starts; a joined cluster uses what its nodes
were started with, or their credential chain). recmix never copies them into a Ray `runtime_env`, task
argument or file. What can still leak is a value that a spec pulls in with `${VAR}`: `redact` replaces, in
any JSON-like object, every occurrence of the value of an environment variable whose name looks secret
with the `${VAR}` text it came from, and the password part of URLs (`scheme://user:password@host`).

    doc = {**metrics, "spec": spec_dump(spec)}     # instead of spec.model_dump(mode="json")
"""

from __future__ import annotations

import os
import re
from typing import Any

# Variable names whose values are treated as secrets wherever they appear.
SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_KEY)", re.I)
# Shorter values are too likely to occur by chance inside ordinary strings (and are no real secret).
MIN_LEN = 8
_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def secret_values() -> dict[str, str]:
    """value -> `${NAME}` for every environment variable with a secret-looking name (longest values first)."""
    found = {v: f"${{{k}}}" for k, v in os.environ.items() if is_secret_name(k) and len(v) >= MIN_LEN}
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))


def redact_text(text: str, values: dict[str, str] | None = None) -> str:
    values = secret_values() if values is None else values
    for value, name in values.items():
        if value in text:
            text = text.replace(value, name)
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def redact(obj: Any, values: dict[str, str] | None = None) -> Any:
    """A copy of a JSON-like object (dicts, lists, strings, scalars) with secret values replaced."""
    values = secret_values() if values is None else values
    if isinstance(obj, str):
        return redact_text(obj, values)
    if isinstance(obj, dict):
        return {redact(k, values) if isinstance(k, str) else k: redact(v, values) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, values) for v in obj]
    return obj


def spec_dump(spec) -> dict:
    """`spec.model_dump(mode="json")` without secret values: what metrics and manifest files may hold."""
    return redact(spec.model_dump(mode="json"))
