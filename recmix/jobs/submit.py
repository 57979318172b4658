"""`recmix submit` and `recmix jobs list|logs|stop`: recmix jobs through the Ray Jobs API (docs/operations.md).

* The spec is validated here first (bad input: exit 2 before anything reaches the cluster), then shipped raw in
  the job's `working_dir`: `${VAR}` references expand on the cluster, from the driver's environment there, so
  no secret of this shell travels in the runtime env (which the state API shows).
* The recmix package travels as a `py_modules` entry; the entrypoint is `python -m recmix.jobs.cli run`, whose
  `address: local` joins the job's cluster (`RAY_ADDRESS`) instead of starting a nested one.
* The driver takes no CPU (`entrypoint_num_cpus=0`): the CPUs stay for the job's tasks and actors.
* Exit code follows the final status: SUCCEEDED 0, FAILED 1, STOPPED 130 (as Ctrl-C).
* Address: `--address` > `RAY_API_SERVER_ADDRESS` > `RAY_ADDRESS` > http://127.0.0.1:8265. Token
  authentication: unless `RAY_AUTH_MODE=disabled`, the token from `RAY_AUTH_TOKEN` > `RAY_AUTH_TOKEN_PATH` >
  `~/.ray/auth_token` is sent as a bearer header (an explicit-address client does not send it by itself).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import recmix
from recmix.platform.errors import RecmixError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}


def resolve_address(address: Optional[str]) -> str:
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if addr == "auto":
        return DEFAULT_ADDRESS
    return addr if "://" in addr else f"http://{addr}"


def auth_headers() -> dict[str, str]:
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if path.is_file():
            token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: Optional[str]):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url, headers=auth_headers())
    except (AuthenticationError, ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecmixError(f"cannot reach the Ray Jobs API at {url}: {first} (start a cluster with `ray start --head`, "
                          f"or give --address / RAY_API_SERVER_ADDRESS; under token authentication export RAY_AUTH_TOKEN)") from None


def runtime_env(spec_path: Path, staging: Path) -> dict:
    """working_dir: a folder holding only the spec (the job's cwd); py_modules: the recmix package."""
    shutil.copy(spec_path, staging / spec_path.name)
    return {"working_dir": str(staging), "py_modules": [str(Path(recmix.__file__).parent)],
            "excludes": ["__pycache__", "*.pyc"], "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}


def submit(spec: str, address: Optional[str] = None, wait: bool = True, submission_id: Optional[str] = None) -> int:
    from recmix.platform.specs.load import load_spec

    path = Path(spec)
    parsed = load_spec(spec)  # bad input fails here, exit 2, before the cluster sees it
    c = client(address)
    with tempfile.TemporaryDirectory(prefix="recmix-submit-") as staging:
        sid = c.submit_job(entrypoint=f"python -m recmix.jobs.cli run {shlex.quote(path.name)}", entrypoint_num_cpus=0,
                           runtime_env=runtime_env(path, Path(staging)), submission_id=submission_id,
                           metadata={"cli": "recmix", "kind": parsed.kind, "spec": path.name})
    print(f"[submit] {parsed.kind} job {sid} submitted to {resolve_address(address)}", flush=True)
    if not wait:
        print(f"[submit] follow it with: recmix jobs logs {sid} --follow", flush=True)
        return 0
    return follow(c, sid)


def follow(c, sid: str) -> int:
    """Stream the job's logs until it ends; the exit code follows its final status. Ctrl-C stops the job."""
    async def tail() -> None:
        async for chunk in c.tail_job_logs(sid):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        c.stop_job(sid)
        print(f"[submit] interrupted: stopping job {sid}", file=sys.stderr)
        raise
    info = c.get_job_info(sid)
    status = str(info.status.value if hasattr(info.status, "value") else info.status)
    print(f"[submit] job {sid} {status}" + (f": {info.message.splitlines()[0]}" if status != "SUCCEEDED" and info.message else ""),
          flush=True)
    return EXIT_CODES.get(status, 1)


def _cmd_submit(args: argparse.Namespace) -> int:
    return submit(args.spec, args.address, wait=not args.no_wait, submission_id=args.submission_id)


def _cmd_list(args: argparse.Namespace) -> int:
    jobs = sorted(client(args.address).list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'SUBMISSION ID':<28} {'STATUS':<10} {'KIND':<9} ENTRYPOINT")
    for j in jobs:
        status = j.status.value if hasattr(j.status, "value") else j.status
        print(f"{j.submission_id or j.job_id or '-':<28} {status:<10} {(j.metadata or {}).get('kind', '-'):<9} {j.entrypoint}")
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    c = client(args.address)
    if args.follow:
        return follow(c, args.id)
    sys.stdout.write(c.get_job_logs(args.id))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    stopped = client(args.address).stop_job(args.id)
    print(f"[jobs] {args.id}: {'stop requested' if stopped else 'not running'}")
    return 0


def add_parsers(sub) -> None:
    """`recmix submit` and `recmix jobs ...` on the CLI's subparsers."""
    addr_help = "Ray dashboard / Jobs API URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, http://127.0.0.1:8265)"
    s = sub.add_parser("submit", help="submit a job spec to a Ray cluster as a Ray job; stream its logs")
    s.add_argument("spec", help="path to the job spec file")
    s.add_argument("--address", help=addr_help)
    s.add_argument("--no-wait", action="store_true", help="return once submitted (exit 0) instead of following the logs")
    s.add_argument("--submission-id", help="the job's id (default: one chosen by Ray)")
    s.set_defaults(fn=_cmd_submit)

    j = sub.add_parser("jobs", help="list, read or stop the Ray jobs of a cluster")
    jsub = j.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    for name, fn, hlp in (("list", _cmd_list, "list the cluster's jobs"), ("logs", _cmd_logs, "print a job's logs"),
                          ("stop", _cmd_stop, "stop a running job")):
        p = jsub.add_parser(name, help=hlp)
        if name != "list":
            p.add_argument("id", help="submission id")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit code follows its status")
        p.add_argument("--address", help=addr_help)
        p.set_defaults(fn=fn)
