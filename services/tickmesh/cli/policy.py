"""`tickmesh policy ...`: check guardrail policy files and manage them on a guardrail service.

tickmesh policy validate FILE...                        check files locally (no server)
tickmesh policy apply FILE [--graph ID] [--dry-run] --guardrail HOST:PORT [--tenant T]
tickmesh policy show [POLICY_ID] [--version N] --guardrail HOST:PORT [--tenant T]
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC
from pathlib import Path
from typing import Any, TextIO

import grpc

from tickmesh.runtime.policy import CompiledPolicy, load_policy
from tickmesh.sdk import ValidationError
from tickmesh.sdk._transport import create_channel, map_rpc_error
from tickmesh.sdk.errors import Issue
from tickmesh.v1 import guardrail_pb2, guardrail_service_pb2, guardrail_service_pb2_grpc

from .auth import client_security

TENANT_METADATA_KEY = "x-tickmesh-tenant"
CALL_TIMEOUT_S = 30.0


def add_parser(sub: Any) -> None:
    """Register ``policy`` and its actions on the command's subparsers."""
    policy = sub.add_parser("policy", help="guardrail policy files")
    actions = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    validate = actions.add_parser(
        "validate", help="check policy files locally (file:line:column field: message)"
    )
    validate.add_argument("files", nargs="+", type=Path)

    apply = actions.add_parser("apply", help="store a policy file as the policy's next version")
    apply.add_argument("file", type=Path)
    apply.add_argument("--graph", default="", help="enforce the policy on this graph id only")
    apply.add_argument(
        "--dry-run",
        action="store_true",
        help="record what the policy would decide without enforcing it",
    )
    _server_args(apply)

    show = actions.add_parser("show", help="list policies, or print one policy's source")
    show.add_argument("policy_id", nargs="?", help="the policy to print (default: list them)")
    show.add_argument("--version", type=int, default=0, help="a version (default: the newest)")
    _server_args(show)


def _server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guardrail", required=True, help="guardrail service host:port")
    parser.add_argument("--tenant", default="default")


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Run the ``policy`` action in ``args``; returns the exit code."""
    if args.policy_command == "validate":
        return cmd_validate(args.files, out)
    if args.policy_command == "apply":
        return asyncio.run(cmd_apply(args, out))
    return asyncio.run(cmd_show(args, out))


# --- validate ---------------------------------------------------------------------------


def _load(path: Path) -> tuple[CompiledPolicy | None, str, list[Issue]]:
    """(compiled policy or None, source, issues) of one file."""
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return None, "", [Issue(f"cannot read the file: {reason}", source=str(path))]
    try:
        return load_policy(source, name=str(path)), source, []
    except ValidationError as exc:
        return None, source, list(exc.issues) or [Issue(str(exc), source=str(path))]


def _describe(policy: CompiledPolicy) -> str:
    rules = f"{len(policy.rules)} rule" + ("" if len(policy.rules) == 1 else "s")
    dry = ", dry run" if policy.dry_run else ""
    return f"policy {policy.id} v{policy.version}, {rules}{dry}"


def cmd_validate(files: list[Path], out: TextIO) -> int:
    failed = 0
    for path in files:
        policy, _, issues = _load(path)
        if policy is None:
            failed += 1
            for issue in issues:
                print(str(issue), file=out)
            continue
        print(f"{path}: ok ({_describe(policy)})", file=out)
    return 1 if failed else 0


# --- apply / show -------------------------------------------------------------------------


async def _call(target: str, tenant: str, method: str, request: Any) -> Any:
    """One GuardrailService call; RPC failures become the SDK's errors."""
    metadata = ((TENANT_METADATA_KEY, tenant),)
    async with create_channel(target, security=client_security()) as channel:
        stub = guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
        try:
            return await getattr(stub, method)(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc) from exc


async def cmd_apply(args: argparse.Namespace, out: TextIO) -> int:
    path: Path = args.file
    policy, source, issues = _load(path)
    if policy is None:
        # Checked here first: the service would refuse it without saying which file.
        for issue in issues:
            print(str(issue), file=out)
        return 1
    request = guardrail_service_pb2.PutPolicyRequest(
        source=source, graph_id=args.graph, dry_run=args.dry_run
    )
    response: guardrail_service_pb2.PutPolicyResponse = await _call(
        args.guardrail, args.tenant, "PutPolicy", request
    )
    stored = response.policy
    if response.created:
        print(f"policy {stored.policy_id} version {stored.version} created", file=out)
    else:
        print(
            f"policy {stored.policy_id} version {stored.version} unchanged "
            "(identical to the newest version)",
            file=out,
        )
    _print_summary(stored, out)
    return 0


async def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    if args.policy_id:
        get = guardrail_service_pb2.GetPolicyRequest(policy_id=args.policy_id, version=args.version)
        found: guardrail_service_pb2.GetPolicyResponse = await _call(
            args.guardrail, args.tenant, "GetPolicy", get
        )
        _print_summary(found.policy, out, header=True)
        print(file=out)
        print(found.policy.source.rstrip("\n"), file=out)
        return 0
    policies: list[guardrail_pb2.Policy] = []
    token = ""
    while True:
        page_request = guardrail_service_pb2.ListPoliciesRequest(page_size=1000, page_token=token)
        page: guardrail_service_pb2.ListPoliciesResponse = await _call(
            args.guardrail, args.tenant, "ListPolicies", page_request
        )
        policies.extend(page.policies)
        token = page.next_page_token
        if not token:
            break
    if not policies:
        print(f"no policies for tenant {args.tenant}", file=out)
        return 0
    rows = [("POLICY", "VERSION", "GRAPH", "MODE", "CREATED", "DIGEST")]
    rows += [
        (
            p.policy_id,
            str(p.version),
            p.graph_id or "*",
            "dry-run" if p.dry_run else "enforced",
            _created(p),
            p.digest[:12],
        )
        for p in policies
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )
    return 0


def _created(policy: guardrail_pb2.Policy) -> str:
    if not policy.HasField("created_at"):
        return "-"
    return policy.created_at.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_summary(policy: guardrail_pb2.Policy, out: TextIO, *, header: bool = False) -> None:
    if header:
        print(f"policy   {policy.policy_id} version {policy.version}", file=out)
    print(f"graph    {policy.graph_id or '* (every graph)'}", file=out)
    print(
        f"mode     {'dry run (recorded, not enforced)' if policy.dry_run else 'enforced'}", file=out
    )
    print(f"created  {_created(policy)}", file=out)
    print(f"digest   {policy.digest}", file=out)
