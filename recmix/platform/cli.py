"""`recmix` command line: validate, run, schema, bench.

Exit codes: 0 success; 1 the job itself failed; 2 bad input (spec, file, URI, checksum), printed as one
line per problem without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Optional, Sequence

from recmix.platform.errors import RecmixError

# kind -> "module:function(spec, cluster_cfg)"; imported lazily so `validate` and `schema` stay fast.
RUNNERS = {
    "prepare": "recmix.jobs.prepare:run",
    "bench": "recmix.jobs.bench_job:run",
    "pipeline": "recmix.jobs.pipeline:run",
    "train": "recmix.jobs.train:run",
}


def runner(kind: str):
    module, _, fn = RUNNERS[kind].partition(":")
    return getattr(importlib.import_module(module), fn)


def _cmd_validate(args: argparse.Namespace) -> int:
    from recmix.platform.specs.load import load_spec

    spec = load_spec(args.spec)
    print(f"{args.spec}: valid {spec.kind} spec")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from recmix.platform.specs.cluster import ClusterConfig
    from recmix.platform.specs.load import load_spec

    spec = load_spec(args.spec)
    cluster = getattr(spec, "cluster", None) or ClusterConfig()
    if args.address:
        cluster = ClusterConfig(**{**cluster.model_dump(), "address": args.address})
    result = runner(spec.kind)(spec, cluster)
    if isinstance(result, dict) and args.json:
        print(json.dumps(result, default=str))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from recmix.platform.specs.job import JOB_ADAPTER, KINDS

    if args.kind is None:
        schema = JOB_ADAPTER.json_schema()
    elif args.kind in KINDS:
        schema = KINDS[args.kind].model_json_schema()
    else:
        raise RecmixError(f"unknown job kind '{args.kind}' (known: {', '.join(sorted(KINDS))})")
    print(json.dumps(schema, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from recmix.platform.bench import run_bench

    run_bench(args.name, quick=args.quick, out=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recmix", description="Industrial-scale ranking models on Ray.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="check a job spec (YAML or JSON) and report every error")
    v.add_argument("spec", help="path to the job spec file")
    v.set_defaults(fn=_cmd_validate)

    r = sub.add_parser("run", help="run a job spec on the embedded local Ray cluster or --address")
    r.add_argument("spec", help="path to the job spec file")
    r.add_argument("--address", help="Ray cluster to join ('auto', host:port, ray://host:port); default: a fresh local cluster")
    r.add_argument("--json", action="store_true", help="print the job's summary as one JSON line at the end")
    r.set_defaults(fn=_cmd_run)

    s = sub.add_parser("schema", help="print the JSON Schema of a job kind (or of all job specs)")
    s.add_argument("kind", nargs="?", help="job kind, e.g. prepare or train")
    s.set_defaults(fn=_cmd_schema)

    b = sub.add_parser("bench", help="run a benchmark; the last line of output is a JSON object")
    b.add_argument("name", help="benchmark name (datagen, models, ugsep, w8a16, ps, ...)")
    b.add_argument("--quick", action="store_true", help="small sizes, within 60 s on 2 cores")
    b.add_argument("--out", help="also write the table and JSON line to this file")
    b.set_defaults(fn=_cmd_bench)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except RecmixError as e:
        print(f"recmix: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
