"""The `sftjob` command: plan, crd, run, operator, local up.

Each subcommand imports what it needs when it runs, so `sftjob plan` stays fast and
works with only the core dependencies installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .api import SpecError
from .documents import sftjobs_in
from .presentation import format_plan, plan_report

EXIT_INVALID_SPEC = 2


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SystemExit(f"error: cannot read {path}: {exc.strerror}") from None


def cmd_plan(args: argparse.Namespace) -> int:
    reports = []
    for path in args.filename:
        try:
            jobs = sftjobs_in(_read(path), source=path)
            if not jobs:
                print(f"error: {path}: no SFTJob documents found", file=sys.stderr)
                return EXIT_INVALID_SPEC
            reports += [plan_report(job, args.dataset_size) for job in jobs]
        except SpecError as exc:
            print(f"error: {path}: invalid SFTJob:", file=sys.stderr)
            for error in exc.errors:
                print(f"  {error}", file=sys.stderr)
            return EXIT_INVALID_SPEC
    if args.output == "json":
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    else:
        print("\n\n".join(format_plan(r) for r in reports))
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    from .crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    import logging
    import os
    import random

    import kopf

    from . import handlers  # noqa: F401  (registers the Kopf handlers)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # Kopf logs every handled watch event at INFO; keep the operator's log for what matters.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.image:
        os.environ["SFTJOB_TRAINER_IMAGE"] = args.image
    namespaces = watched_namespaces(args.namespace, args.all_namespaces, os.environ)
    # Peering: replicas with different priorities elect the highest as the active one.
    priority = args.priority if args.priority is not None else random.randint(1, 1_000_000)
    kopf.run(
        standalone=args.standalone,
        priority=None if args.standalone else priority,
        peering_name=None if args.standalone else args.peering,
        clusterwide=namespaces is None,
        namespaces=namespaces or [],
        liveness_endpoint=args.liveness,
    )
    return 0


NAMESPACES_ENV = "SFTJOB_NAMESPACES"


def watched_namespaces(
    flags: Sequence[str] | None, all_namespaces: bool, env: Mapping[str, str]
) -> list[str] | None:
    """The namespaces the operator watches, None for every namespace (`-A`).

    `-n` may be repeated and each value may be a comma list (`-n a -n b`, `-n a,b`); without
    `-n` or `-A`, `$SFTJOB_NAMESPACES` (a comma list, as a Deployment sets it) decides, else
    the namespace `default`. Kopf then lists and watches each named namespace only, never
    the whole cluster (except cluster-scoped kinds and the namespaces themselves).
    """
    if all_namespaces:
        return None
    given = list(flags) if flags else [env.get(NAMESPACES_ENV, "")]
    names = [name.strip() for value in given for name in value.split(",") if name.strip()]
    return list(dict.fromkeys(names)) or ["default"]


def cmd_run(args: argparse.Namespace) -> int:
    from sftjob_trainer.local_run import run_file

    result: int = run_file(args.filename, workdir=args.workdir, dataset_size=args.dataset_size)
    return result


def cmd_tiny_data(args: argparse.Namespace) -> int:
    # Needs the trainer extra (torch, transformers); builds everything locally.
    from sftjob_trainer.tiny import build_tiny_model, write_tiny_datasets

    model = build_tiny_model(args.dir / "tiny-model")
    files = write_tiny_datasets(args.dir)
    print(f"tiny model: {model}")
    for kind, path in files.items():
        print(f"{kind} dataset: {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    # Development tooling: the local control plane and the trainer on this machine.
    from sftjob_local.demo import run_demo

    return run_demo(args.workdir, keep=args.keep, timeout=args.timeout)


def cmd_reference(args: argparse.Namespace) -> int:
    from .reference import reference_markdown, write_into

    if args.write:
        write_into(args.write)
    else:
        sys.stdout.write(reference_markdown())
    return 0


def cmd_local_up(args: argparse.Namespace) -> int:
    # Development tooling only: production code paths never import sftjob_local.
    from sftjob_local.cluster import parse_node_labels, parse_node_taints, run_local_up
    from sftjob_local.node_spec import parse_quantity

    try:
        labels = parse_node_labels(args.node_labels)
        taints = parse_node_taints(args.node_taints)
        if args.memory is not None and parse_quantity(args.memory) <= 0:
            raise ValueError(f"--memory must be positive, not {args.memory!r}")
        if args.cpus is not None and args.cpus <= 0:
            raise ValueError("--cpus must be positive")
        if args.nodes < 1 or (args.max_pods is not None and args.max_pods < 0):
            raise ValueError("--nodes must be at least 1 and --max-pods not negative")
    except ValueError as exc:
        print(f"sftjob local up: {exc}", file=sys.stderr)
        return 2
    code: int = run_local_up(
        port=args.port,
        kubeconfig=args.kubeconfig,
        workdir=args.workdir,
        gpus=args.gpus,
        nodes=args.nodes,
        cpus=args.cpus,
        memory=args.memory,
        max_pods=args.max_pods,
        node_labels=labels,
        node_taints=taints,
        ephemeral=args.ephemeral,
    )
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftjob", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="print the step plan and advisories of SFTJob manifests")
    plan.add_argument(
        "-f", "--filename", action="append", required=True, help="YAML file (or -), repeatable"
    )
    plan.add_argument("-o", "--output", choices=["table", "json"], default="table")
    plan.add_argument(
        "--dataset-size",
        type=int,
        default=None,
        metavar="N",
        help="plan for N rows instead of the size the manifest declares",
    )
    plan.set_defaults(func=cmd_plan)

    crd = sub.add_parser("crd", help="print the SFTJob CustomResourceDefinition (YAML)")
    crd.set_defaults(func=cmd_crd)

    op = sub.add_parser("operator", help="run the operator against the current kubeconfig")
    scope = op.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        metavar="NAMESPACE[,NAMESPACE...]",
        help=f"namespace(s) to watch; repeat or comma-separate (default: ${NAMESPACES_ENV}, "
        "else default)",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    op.add_argument(
        "--standalone",
        action="store_true",
        help="no peering (one replica; the local control plane)",
    )
    op.add_argument("--peering", default="sftjob-operator", help="KopfPeering name for replicas")
    op.add_argument("--priority", type=int, default=None, help="peering priority (default random)")
    op.add_argument("--liveness", default=None, help="e.g. http://0.0.0.0:8080/healthz")
    op.add_argument("--image", default=None, help="default trainer image for jobs without one")
    op.add_argument("-v", "--verbose", action="store_true")
    op.set_defaults(func=cmd_operator)

    run = sub.add_parser("run", help="train an SFTJob manifest on this machine, no Kubernetes")
    run.add_argument("-f", "--filename", type=Path, required=True)
    run.add_argument("--workdir", type=Path, default=None, help="where outputs go if not writable")
    run.add_argument("--dataset-size", type=int, default=None, metavar="N")
    run.set_defaults(func=cmd_run)

    tiny = sub.add_parser(
        "tiny-data", help="build a tiny model and datasets locally (no hub), for sftjob run"
    )
    tiny.add_argument("--dir", type=Path, default=Path(".sftjob-data"))
    tiny.set_defaults(func=cmd_tiny_data)

    demo = sub.add_parser(
        "demo", help="local control plane + operator + tiny training jobs, with live progress"
    )
    demo.add_argument("--workdir", type=Path, default=Path(".sftjob-demo"))
    demo.add_argument("--keep", action="store_true", help="keep the cluster up afterwards")
    demo.add_argument("--timeout", type=float, default=280, help="seconds to wait for the jobs")
    demo.set_defaults(func=cmd_demo)

    ref = sub.add_parser("reference", help="print the SFTJob field reference (Markdown)")
    ref.add_argument("--write", type=Path, default=None, help="refresh the table inside this file")
    ref.set_defaults(func=cmd_reference)

    local = sub.add_parser("local", help="the local control plane (development and tests)")
    local_sub = local.add_subparsers(dest="local_command", required=True)
    up = local_sub.add_parser(
        "up", help="run a local Kubernetes API and a node that runs pods as processes"
    )
    up.add_argument("--port", type=int, default=8765)
    up.add_argument("--workdir", type=Path, default=Path(".sftjob-local"))
    up.add_argument("--kubeconfig", type=Path, default=None, help="default: WORKDIR/kubeconfig")
    up.add_argument("--gpus", type=int, default=0, help="GPUs each local node advertises")
    up.add_argument(
        "--nodes", type=int, default=1, help="nodes: local-node, local-node-2, ... (default 1)"
    )
    up.add_argument(
        "--cpus", type=float, default=None, help="CPUs of each node (default: this machine's)"
    )
    up.add_argument(
        "--memory",
        default=None,
        help="memory of each node, a quantity such as 8Gi (default: this machine's MemTotal)",
    )
    up.add_argument(
        "--max-pods",
        type=int,
        default=None,
        help="pods each node runs at once (default: 4 per CPU, at least 4; a real kubelet "
        "says 110, but every pod here is a process on this machine)",
    )
    up.add_argument("--node-labels", default=None, help="extra node labels: key=value,key2=value2")
    up.add_argument(
        "--node-taints",
        default=None,
        help="node taints: key[=value]:NoSchedule|PreferNoSchedule|NoExecute, comma-separated",
    )
    up.add_argument(
        "--ephemeral",
        action="store_true",
        help="keep the cluster's objects in memory only (default: WORKDIR/state.db, kept "
        "across restarts)",
    )
    up.set_defaults(func=cmd_local_up)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "dataset_size", None) is not None and args.dataset_size < 1:
        print("error: --dataset-size must be >= 1", file=sys.stderr)
        return EXIT_INVALID_SPEC
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
