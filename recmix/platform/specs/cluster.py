"""Where jobs run: the embedded local Ray cluster or an existing one."""

from __future__ import annotations

import re
from typing import Annotated, Optional

from pydantic import Field, field_validator

from .base import StrictModel


class ClusterConfig(StrictModel):
    """`address: local` starts a fresh in-process cluster (never attaches to a stale one)."""

    address: Annotated[str, Field(min_length=1, max_length=256)] = "local"
    num_cpus: Optional[Annotated[float, Field(gt=0, le=4096)]] = None
    dashboard_host: Annotated[str, Field(min_length=1, max_length=64)] = "127.0.0.1"
    dashboard_port: Optional[Annotated[int, Field(ge=1024, le=65535)]] = None

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if v in ("local", "auto") or re.match(r"^(ray|ray\+tls)://[^\s]+$", v) or re.match(r"^[A-Za-z0-9.\-]+:\d{1,5}$", v):
            return v
        raise ValueError(f"cluster address must be 'local', 'auto', 'host:port' or 'ray://host:port', got '{v}'")
