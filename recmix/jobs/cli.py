"""`recmix` command line: validate, run, score, schema, bench.

Exit codes: 0 success; 1 the job itself failed; 2 bad input (spec, file, URI, checksum, flag), printed as one
line per problem without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from typing import Optional, Sequence

import recmix
from recmix.platform.errors import RecmixError


def _cmd_validate(args: argparse.Namespace) -> int:
    from recmix.platform.specs.load import load_spec

    spec = load_spec(args.spec)
    print(f"{args.spec}: valid {spec.kind} spec")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from recmix.jobs.registry import runner
    from recmix.platform.specs.cluster import ClusterConfig
    from recmix.platform.specs.load import load_spec

    spec = load_spec(args.spec)
    cluster = getattr(spec, "cluster", None) or ClusterConfig()
    if args.address:
        cluster = ClusterConfig(**{**cluster.model_dump(), "address": args.address})
    result = runner(spec.kind, restart=args.restart)(spec, cluster)
    if isinstance(result, dict) and args.json:
        print(json.dumps(result, default=str))
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from recmix.jobs.train.score import score
    from recmix.platform.specs.data import StorageConfig

    res = score(args.artifact, args.dataset, args.split, StorageConfig(endpoint_url=args.endpoint_url) if args.endpoint_url
                else None, quant=args.quant)
    if args.json:
        print(json.dumps(res, default=float))
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


def _set_values(name: str, pairs: list[str]) -> dict:
    """`--set key=value` -> params dict; values are YAML scalars, a list field also takes `a,b,c`."""
    import yaml

    from recmix.platform.specs.bench import BENCH_PARAMS

    model = BENCH_PARAMS.get(name)
    out: dict = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq or not key:
            raise RecmixError(f"--set {pair!r}: expected key=value")
        if model is None:
            continue  # the unknown bench name is reported by the spec, naming it
        if key not in model.model_fields:
            known = ", ".join(sorted(model.model_fields)) or "none"
            raise RecmixError(f"--set {key}: unknown parameter of bench '{name}' (known: {known})")
        is_list = typing.get_origin(model.model_fields[key].annotation) is list
        try:
            value = yaml.safe_load(f"[{raw}]" if is_list and not raw.lstrip().startswith("[") else raw)
        except yaml.YAMLError:
            value = raw  # pydantic reports it, naming the field
        out[key] = value
    return out


def _cmd_bench(args: argparse.Namespace) -> int:
    from recmix.jobs.bench import run_bench
    from recmix.platform.specs.load import parse_spec

    data = {"kind": "bench", "name": args.name, "quick": args.quick, "params": _set_values(args.name, args.set)}
    if args.out:
        data["out"] = args.out
    run_bench(parse_spec(data, f"recmix bench {args.name}"))
    return 0


def _cmd_serve_config(args: argparse.Namespace) -> int:
    from recmix.jobs.serve.config import write
    from recmix.platform.specs.load import load_spec

    spec = load_spec(args.spec)
    if spec.kind != "serve":
        raise RecmixError(f"{args.spec}: serve-config needs a 'serve' spec, got kind '{spec.kind}'")
    write(spec, args.out)
    print(f"{args.out}: Serve config for application '{spec.name}' (serve deploy {args.out})")
    return 0


def _bench_epilog() -> str:
    from recmix.jobs.bench import BENCHES
    from recmix.platform.specs.bench import BENCH_PARAMS

    lines = ["benchmarks:"]
    for name, b in BENCHES.items():
        params = ", ".join(BENCH_PARAMS[name].model_fields)
        lines.append(f"  {name:<14} {b.description}" + (f" [--set {params}]" if params else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recmix", description="Industrial-scale ranking models on Ray.")
    p.add_argument("--version", action="version", version=f"recmix {recmix.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="check a job spec (YAML or JSON) and report every error")
    v.add_argument("spec", help="path to the job spec file")
    v.set_defaults(fn=_cmd_validate)

    r = sub.add_parser("run", help="run a job spec on the embedded local Ray cluster or --address")
    r.add_argument("spec", help="path to the job spec file")
    r.add_argument("--address", help="Ray cluster to join ('auto', host:port, ray://host:port); default: a fresh local cluster")
    r.add_argument("--json", action="store_true", help="print the job's summary as one JSON line at the end")
    r.add_argument("--restart", action="store_true",
                   help="train jobs: start a fresh run instead of resuming the interrupted one (its checkpoints are deleted)")
    r.set_defaults(fn=_cmd_run)

    sc = sub.add_parser("score", help="score a prepared dataset split with a trained model artifact (AUC, logloss)")
    sc.add_argument("artifact", help="artifact folder (<output>/artifact, its LATEST version) or one version folder")
    sc.add_argument("dataset", help="prepared dataset URI")
    sc.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split to score (default: test)")
    sc.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URIs")
    sc.add_argument("--quant", choices=["w8a16"], help="score the artifact's W8A16 weights (a run trained with `quantize:`)")
    sc.add_argument("--json", action="store_true", help="print the metrics as one JSON line at the end")
    sc.set_defaults(fn=_cmd_score)

    s = sub.add_parser("schema", help="print the JSON Schema of a job kind (or of all job specs)")
    s.add_argument("kind", nargs="?", help="job kind, e.g. prepare or train")
    s.set_defaults(fn=_cmd_schema)

    b = sub.add_parser("bench", help="run a benchmark; the last line of output is a JSON object", epilog=_bench_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("name", help="benchmark name (listed below)")
    b.add_argument("--quick", action="store_true", help="small sizes, within 60 s on 2 cores")
    b.add_argument("--out", help="also write the table and JSON line to this file")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a bench parameter (repeatable), e.g. --set seeds=0,1 --set dataset=./artifacts/synthetic")
    b.set_defaults(fn=_cmd_bench)

    sv = sub.add_parser("serve-config", help="write the Serve config YAML (for `serve deploy`) of a serve spec")
    sv.add_argument("spec", help="path to the serve spec file")
    sv.add_argument("-o", "--out", default="serve_config.yaml", help="output file (default: serve_config.yaml)")
    sv.set_defaults(fn=_cmd_serve_config)

    from recmix.jobs import k8s, submit  # recmix submit, recmix jobs list|logs|stop (Ray Jobs API), recmix k8s

    submit.add_parsers(sub)
    k8s.add_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except RecmixError as e:
        print(f"recmix: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The job's cleanup (cluster shutdown, temp files) already ran on the way out.
        print("recmix: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
