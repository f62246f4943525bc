"""The `sftjob` command: plan, crd, run, operator, local up, get, status, watch.

Each subcommand imports what it needs when it runs, so `sftjob plan` stays fast and
works with only the core dependencies installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .api import DEFAULT_TRAINER_IMAGE, SFTJob, SpecError
from .documents import sftjobs_in, sftprofiles_in
from .presentation import format_plan, plan_report, policy_report
from .profile_api import LabelSelector, SFTProfile

EXIT_INVALID_SPEC = 2
# A valid job its profile (or the operator's built-in rules) refuses: the operator would
# fail it with PolicyViolation and create no pod.
EXIT_POLICY_VIOLATION = 3
# The label the API server puts on every namespace (NamespaceDefaultLabelName).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SystemExit(f"error: cannot read {path}: {exc.strerror}") from None


def _spec_error(path: str, kind: str, exc: SpecError) -> int:
    print(f"error: {path}: invalid {kind}:", file=sys.stderr)
    for error in exc.errors:
        print(f"  {error}", file=sys.stderr)
    return EXIT_INVALID_SPEC


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` as a dict; raises ValueError naming a part without '='."""
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"{part!r} is not key=value")
        labels[key] = value
    return labels


def _checked_report(
    job: SFTJob, profiles: list[SFTProfile], args: argparse.Namespace
) -> dict[str, Any]:
    """The plan of the job as it would run (over its profile) and the policy's verdict."""
    from .policy import resolve

    namespace = args.namespace or job.metadata.namespace or "default"
    if args.namespace_labels is None:
        # No labels given: the profiles given are the ones to check against, so each one
        # selects the namespace (several then need spec.profile, as in the cluster).
        labels: dict[str, str] = {}
        profiles = [
            p.model_copy(
                update={"spec": p.spec.model_copy(update={"namespaceSelector": LabelSelector()})}
            )
            for p in profiles
        ]
    else:
        labels = {NAMESPACE_NAME_LABEL: namespace, **args.namespace_labels}
    resolution = resolve(
        job.spec,
        namespace,
        labels,
        profiles,
        require_profile=args.require_profile,
        default_image=args.default_image,
    )
    effective = job.model_copy(update={"spec": resolution.spec})
    prepared, note = _tokenizer_pass(effective, args)
    report = plan_report(effective, args.dataset_size, prepared)
    if note:
        report["notes"].append(note)
    return {**report, "policy": policy_report(resolution)}


def _tokenizer_pass(job: SFTJob, args: argparse.Namespace) -> tuple[Any, str | None]:
    """Prepared rows from the model's tokenizer over the data, where this machine has both."""
    from .tokenized_plan import tokenize, worth_tokenizing

    if args.dataset_size is not None or args.tokenize == "never":
        return None, None
    if args.tokenize == "auto" and not worth_tokenizing(job.spec):
        return None, None
    result = tokenize(job)
    return result.rows, result.note


def _documents(paths: Sequence[str], parse: Callable[..., list[Any]], kind: str) -> list[Any] | int:
    """Every `kind` document of the files, or the exit code after naming what is wrong."""
    found: list[Any] = []
    for path in paths:
        try:
            documents = parse(_read(path), source=path)
        except SpecError as exc:
            return _spec_error(path, kind, exc)
        if not documents:
            print(f"error: {path}: no {kind} documents found", file=sys.stderr)
            return EXIT_INVALID_SPEC
        found += documents
    return found


def cmd_plan(args: argparse.Namespace) -> int:
    profiles = _documents(args.profile, sftprofiles_in, "SFTProfile")
    if isinstance(profiles, int):
        return profiles
    jobs = _documents(args.filename, sftjobs_in, "SFTJob")
    if isinstance(jobs, int):
        return jobs
    reports = [_checked_report(job, profiles, args) for job in jobs]
    if args.output == "json":
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    else:
        print("\n\n".join(format_plan(r) for r in reports))
    refused = sum(len(r["policy"]["violations"]) for r in reports)
    if refused:
        print(f"error: {refused} policy violation{'s' if refused > 1 else ''}", file=sys.stderr)
        return EXIT_POLICY_VIOLATION
    return 0


def _labels_argument(text: str) -> dict[str, str]:
    try:
        return parse_labels(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_crd(args: argparse.Namespace) -> int:
    from .crd import crd_yaml, profile_crd_yaml, write_crds

    if args.write is not None:
        for path in write_crds(args.write):
            print(f"wrote {path}")
        return 0
    sys.stdout.write(profile_crd_yaml() if args.kind == "sftprofile" else crd_yaml())
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
    from .reference import profile_reference_markdown, reference_markdown, write_into

    if args.write:
        write_into(args.write)
    else:
        sys.stdout.write(
            profile_reference_markdown() if args.kind == "sftprofile" else reference_markdown()
        )
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


# ----------------------------------------------------------------------------- terminal views
# `sftjob get`, `sftjob status`, `sftjob watch`: the user's kubeconfig, reads only
# (kube.JobReader), text from the pure job_view.

EXIT_NOT_FOUND = 1


def _reader(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The JobReader for the user's kubeconfig, and the namespace to read (None with -A)."""
    from kubernetes.config import ConfigException

    from .kube import JobReader, user_api_client

    try:
        client, context_namespace = user_api_client(args.kubeconfig, args.context)
    except ConfigException as exc:  # no kubeconfig, or no such context: kubectl's exit 1
        raise SystemExit(f"error: {exc}") from None
    if getattr(args, "all_namespaces", False):
        return JobReader(client), None
    return JobReader(client), args.namespace or context_namespace


def _api_error(exc: Exception) -> int:
    """An API refusal as kubectl words it: `Error from server (Forbidden): <message>`."""
    body = getattr(exc, "body", None)
    try:
        status = json.loads(body) if body else {}
    except ValueError:
        status = {}
    reason = status.get("reason") or getattr(exc, "reason", "") or "Error"
    message = status.get("message") or str(exc).strip()
    print(f"Error from server ({reason}): {message}", file=sys.stderr)
    return 1


def _now() -> Any:
    import datetime

    return datetime.datetime.now(datetime.UTC)


def cmd_get(args: argparse.Namespace) -> int:
    from kubernetes.client import ApiException

    from . import job_view

    reader, namespace = _reader(args)
    try:
        if args.name:
            job = reader.get_job(namespace or "default", args.name)
            if job is None:
                print(job_view.not_found_text(args.name, namespace or "default"), file=sys.stderr)
                return EXIT_NOT_FOUND
            jobs = [job]
        else:
            jobs, _ = reader.list_jobs(namespace)
    except ApiException as exc:
        return _api_error(exc)
    if args.output in ("json", "yaml"):
        shown = jobs[0] if args.name else job_view.as_list(jobs)
        sys.stdout.write(job_view.dump(shown, args.output).rstrip("\n") + "\n")
        return 0
    if not jobs:
        print(job_view.no_jobs_text(namespace), file=sys.stderr)
        return 0
    print(
        job_view.jobs_table(
            jobs, _now(), all_namespaces=namespace is None, wide=args.output == "wide"
        )
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from kubernetes.client import ApiException

    from . import job_view

    reader, namespace = _reader(args)
    namespace = namespace or "default"
    try:
        job = reader.get_job(namespace, args.name)
        if job is None:
            print(job_view.not_found_text(args.name, namespace), file=sys.stderr)
            return EXIT_NOT_FOUND
        events = reader.list_job_events(namespace, args.name)
    except ApiException as exc:
        return _api_error(exc)
    curves = job_view.loss_curves(job)
    chart = None
    if curves:
        try:
            chart = job_view.loss_chart(curves, color=sys.stdout.isatty())
        except ImportError as exc:
            chart = f"  {exc}"
    print(job_view.status_text(job, events, _now(), chart=chart))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """A live table from a watch; Ctrl-C (even while starting up) ends it quietly with 0."""
    try:
        return _watch(args)
    except KeyboardInterrupt:
        return 0


def _watch(args: argparse.Namespace) -> int:
    """List, then watch from the list's version; 410 Gone → list again."""
    import time

    from kubernetes.client import ApiException

    from . import job_view
    from .kube import WatchExpired

    reader, namespace = _reader(args)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    redraw = sys.stdout.isatty()
    shown = ""

    def show(jobs: dict[Any, Any]) -> None:
        nonlocal shown
        table = (
            job_view.jobs_table(jobs.values(), _now(), all_namespaces=namespace is None)
            if jobs
            else job_view.no_jobs_text(namespace)
        )
        if table == shown:
            return
        shown = table
        # On a terminal the table is redrawn in place; into a pipe, one table per change.
        sys.stdout.write(("\x1b[H\x1b[2J" if redraw else "") + table + "\n\n")
        sys.stdout.flush()

    def finished(jobs: dict[Any, Any]) -> bool:
        return args.until_finished and job_view.all_finished(jobs.values())

    try:
        while True:
            listed, version = reader.list_jobs(namespace)
            jobs = {job_view.job_key(job): job for job in listed}
            show(jobs)
            try:
                while not finished(jobs):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return 0
                    window = 300 if left is None else max(1, min(300, int(left + 0.999)))
                    for kind, obj in reader.watch_jobs(namespace, version, window):
                        version = job_view.resource_version(obj) or version
                        if kind == "BOOKMARK":
                            continue  # only a newer version to resume from: nothing changed
                        jobs = job_view.apply_watch_event(jobs, job_view.WatchEvent(kind, obj))
                        show(jobs)
                        if finished(jobs):
                            break
                return 0
            except WatchExpired:
                continue  # the version is gone from the server's history: list again
    except ApiException as exc:
        return _api_error(exc)


def _add_view_parsers(sub: Any) -> None:
    """The subcommands `get`, `status` and `watch` (their shared kubeconfig options)."""

    def connection(command: argparse.ArgumentParser, all_namespaces: bool = True) -> None:
        command.add_argument(
            "--kubeconfig",
            default=None,
            help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)",
        )
        command.add_argument("--context", default=None, help="kubeconfig context to use")
        if not all_namespaces:
            command.add_argument(
                "-n", "--namespace", default=None, help="default: the context's namespace"
            )
            return
        scope = command.add_mutually_exclusive_group()
        scope.add_argument(
            "-n", "--namespace", default=None, help="default: the context's namespace"
        )
        scope.add_argument(
            "-A", "--all-namespaces", action="store_true", help="jobs of every namespace"
        )

    get = sub.add_parser("get", help="list SFTJobs with their plan, like kubectl get sft")
    get.add_argument("name", nargs="?", default=None, help="one job (default: all)")
    connection(get)
    get.add_argument("-o", "--output", choices=["wide", "json", "yaml"], default=None)
    get.set_defaults(func=cmd_get)

    status = sub.add_parser(
        "status",
        help="one job: conditions, plan vs measured, effective spec, loss curve, events",
    )
    status.add_argument("name", help="the SFTJob")
    connection(status, all_namespaces=False)
    status.set_defaults(func=cmd_status)

    watch = sub.add_parser(
        "watch", help="a live table of SFTJobs, redrawn on each change (an API watch)"
    )
    connection(watch)
    watch.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after SECONDS (exit 0); default: until Ctrl-C",
    )
    watch.add_argument(
        "--until-finished",
        action="store_true",
        help="stop once every job shown has Succeeded or Failed",
    )
    watch.set_defaults(func=cmd_watch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftjob", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="print the step plan and advisories of SFTJob manifests")
    plan.add_argument(
        "-f", "--filename", action="append", required=True, help="YAML file (or -), repeatable"
    )
    plan.add_argument("-o", "--output", choices=["table", "json"], default="table")
    plan.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="FILE",
        help="SFTProfile YAML (one or several documents; repeatable): show the effective spec "
        "and the verdict the operator would give. Without it only the operator's built-in "
        f"rules apply. Exit {EXIT_POLICY_VIOLATION} when the job breaks the policy",
    )
    plan.add_argument(
        "--namespace",
        default=None,
        help="namespace the job would be created in (default: its metadata.namespace, else "
        "default)",
    )
    plan.add_argument(
        "--namespace-labels",
        type=_labels_argument,
        default=None,
        metavar="K=V,...",
        help="the namespace's labels, to select profiles by their namespaceSelector as the "
        f"operator does ({NAMESPACE_NAME_LABEL} is added). Without it every profile given "
        "selects the namespace: one is used, several need spec.profile",
    )
    plan.add_argument(
        "--require-profile",
        action="store_true",
        help="refuse a job no profile selects, as an operator that requires a profile does",
    )
    plan.add_argument(
        "--default-image",
        default=DEFAULT_TRAINER_IMAGE,
        metavar="IMAGE",
        help="the operator's default trainer image, checked against allowedImages for jobs "
        "that name none (default: %(default)s)",
    )
    plan.add_argument(
        "--dataset-size",
        type=int,
        default=None,
        metavar="N",
        help="plan for N rows instead of the size the manifest declares",
    )
    plan.add_argument(
        "--tokenize",
        choices=["auto", "always", "never"],
        default="auto",
        help="run the model's tokenizer and TRL's data preparation over the data when both "
        "are on this machine (model.path or model.tokenizer, dataset.path), for the exact "
        "row count: auto does it where the plan would be an estimate (packing, rows that can "
        "be dropped); needs the trainer's packages (default: %(default)s)",
    )
    plan.set_defaults(func=cmd_plan)

    crd = sub.add_parser(
        "crd", help="print a CustomResourceDefinition (YAML), or write them all into a folder"
    )
    crd.add_argument(
        "--kind", choices=["sftjob", "sftprofile"], default="sftjob", help="which CRD to print"
    )
    crd.add_argument(
        "--write",
        type=Path,
        default=None,
        metavar="DIR",
        help="write every CRD into DIR (sftjob.yaml, sftprofile.yaml) instead of printing one",
    )
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

    ref = sub.add_parser(
        "reference", help="print a field reference (Markdown), or refresh both in a README"
    )
    ref.add_argument(
        "--kind", choices=["sftjob", "sftprofile"], default="sftjob", help="which to print"
    )
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
    _add_view_parsers(sub)
    add_logs_and_plot(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "dataset_size", None) is not None and args.dataset_size < 1:
        print("error: --dataset-size must be >= 1", file=sys.stderr)
        return EXIT_INVALID_SPEC
    result: int = args.func(args)
    return result


# ----------------------------------------------------------------- sftjob logs / sftjob plot

# Seconds between looks while `sftjob logs -f` waits for the pod to start.
LOG_WAIT_SECONDS = 2.0
EXIT_NO_LOGS = 1


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The kubectl flags that pick the cluster and namespace."""
    parser.add_argument("name", help="the SFTJob's name")
    parser.add_argument(
        "-n", "--namespace", default=None, help="default: the kubeconfig context's namespace"
    )
    parser.add_argument(
        "--kubeconfig", default=None, help="default: $KUBECONFIG, else ~/.kube/config"
    )
    parser.add_argument("--context", default=None, help="kubeconfig context (default: current)")


def _log_reader(args: argparse.Namespace) -> tuple[Any, str]:
    """The LogReader for the user's kubeconfig, and the namespace to read."""
    from .kube import LogReader, user_api_client

    client, context_namespace = user_api_client(args.kubeconfig, args.context)
    return LogReader(client), args.namespace or context_namespace


def _api_message(exc: Any) -> str:
    """The API server's own message from an ApiException (its Status body), else its reason."""
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return f"{exc.status} {exc.reason}"


def _cluster_error(exc: BaseException, what: str, namespace: str) -> int:
    from kubernetes.client import ApiException

    if isinstance(exc, ApiException) and exc.status == 403:
        print(
            f"error: {_api_message(exc)}\n  {what} needs, in namespace {namespace}: get on "
            "sftjobs.tuning.sftjob.dev, list on pods, get on pods/log",
            file=sys.stderr,
        )
    elif isinstance(exc, ApiException):
        print(f"error: {_api_message(exc)}", file=sys.stderr)
    else:
        print(f"error: {exc}", file=sys.stderr)
    return EXIT_NO_LOGS


def _find_log_target(reader: Any, namespace: str, args: argparse.Namespace) -> Any:
    """The pod to read, or the exit code after saying why there is none (waits with -f)."""
    import time

    from .children import LABEL_JOB
    from .log_target import NoLogs, choose_pod, job_missing

    told = None
    while True:
        job = reader.read_job(namespace, args.name)
        if job is None:
            print(f"error: {job_missing(args.name, namespace)}", file=sys.stderr)
            return EXIT_NO_LOGS
        pods = reader.list_job_pods(namespace, args.name, LABEL_JOB)
        try:
            return choose_pod(job, pods, args.rank, args.attempt)
        except NoLogs as exc:
            if not (args.follow and exc.may_come):
                print(f"error: {exc.message}", file=sys.stderr)
                return EXIT_NO_LOGS
            if exc.message != told:
                print(f"waiting: {exc.message}", file=sys.stderr)
                told = exc.message
        time.sleep(LOG_WAIT_SECONDS)


def cmd_logs(args: argparse.Namespace) -> int:
    from kubernetes.client import ApiException
    from kubernetes.config import ConfigException

    from .log_target import TRAINER_CONTAINER

    namespace = args.namespace or ""
    try:
        reader, namespace = _log_reader(args)
        target = _find_log_target(reader, namespace, args)
        if isinstance(target, int):
            return target
        print(f"logs of {target.describe()}", file=sys.stderr)
        out = sys.stdout.buffer
        if args.follow:
            for chunk in reader.stream_log(namespace, target.pod, TRAINER_CONTAINER, args.tail):
                out.write(chunk)
                out.flush()
        else:
            out.write(reader.read_log(namespace, target.pod, TRAINER_CONTAINER, args.tail))
            out.flush()
    except KeyboardInterrupt:
        return 0  # Ctrl-C ends a follow: what the user asked for
    except BrokenPipeError:
        return 0  # `sftjob logs NAME | head`: the reader has what it wanted
    except (ApiException, ConfigException, OSError) as exc:
        return _cluster_error(exc, "sftjob logs", namespace)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from kubernetes.client import ApiException
    from kubernetes.config import ConfigException

    from .log_target import job_missing, job_phase
    from .loss_plot import MissingPlotting, figure_title, has_curves, loss_figure, write_png

    namespace = args.namespace or ""
    try:
        reader, namespace = _log_reader(args)
        job = reader.read_job(namespace, args.name)
    except (ApiException, ConfigException, OSError) as exc:
        return _cluster_error(exc, "sftjob plot", namespace)
    if job is None:
        print(f"error: {job_missing(args.name, namespace)}", file=sys.stderr)
        return EXIT_NO_LOGS
    progress = (job.get("status") or {}).get("progress") or {}
    history = progress.get("history") or []
    phase = job_phase(job)
    if not has_curves(history):
        print(
            f"error: job {args.name} has no loss history yet (phase {phase}): the trainer "
            "reports a point every spec.training.loggingSteps steps once it trains; try "
            f"again when `kubectl get sft {args.name}` shows a step",
            file=sys.stderr,
        )
        return EXIT_NO_LOGS
    try:
        figure = loss_figure(history, figure_title(args.name, phase, progress))
        write_png(figure, args.output)
    except MissingPlotting as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_LOGS
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return EXIT_NO_LOGS
    steps = [point.get("step") for point in history]
    print(f"wrote {args.output}: {len(history)} points, steps {steps[0]} to {steps[-1]}")
    return 0


def add_logs_and_plot(sub: Any) -> None:
    """`sftjob logs` and `sftjob plot`: read a job in a cluster with the user's kubeconfig."""
    logs = sub.add_parser(
        "logs", help="print a job's trainer log: a rank's pod of the current attempt"
    )
    _add_cluster_arguments(logs)
    logs.add_argument("--rank", type=int, default=0, help="which rank's pod (default 0)")
    logs.add_argument(
        "--attempt",
        type=int,
        default=None,
        metavar="K",
        help="which attempt (default: the current one; earlier attempts' pods are deleted "
        "when the next launches)",
    )
    logs.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="stream the log until the pod ends (waits for a pod not started yet; Ctrl-C stops)",
    )
    logs.add_argument(
        "--tail", type=int, default=None, metavar="N", help="only the last N lines to start"
    )
    logs.set_defaults(func=cmd_logs)

    plot = sub.add_parser(
        "plot", help="write a PNG of a job's loss, eval loss and learning-rate curves"
    )
    _add_cluster_arguments(plot)
    plot.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    plot.set_defaults(func=cmd_plot)


if __name__ == "__main__":
    sys.exit(main())
