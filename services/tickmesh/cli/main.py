"""The `tickmesh` command line.

tickmesh dev                      run the embedded mesh in the foreground
tickmesh run GRAPH.yaml --input JSON   run a lifetime end to end and print its trace
tickmesh status LIFETIME          show a lifetime
tickmesh watch LIFETIME [--after N]   stream a lifetime's events (after sequence N)
tickmesh trace LIFETIME           print a lifetime's executions as a tree (with fork lineage)
tickmesh signal LIFETIME NAME --data JSON [--approver WHO]   wake a waiting lifetime
tickmesh fork LIFETIME EXECUTION [--output JSON]   continue a lifetime from one execution
tickmesh replay LIFETIME [--graph-version N] [--handlers PATH]   re-drive a lifetime and
                                  compare its decisions (and its handlers' code digests)
tickmesh graph validate FILE...   check graph files (file:line:column errors)
tickmesh policy validate|apply|show   guardrail policies (see tickmesh.cli.policy)
tickmesh auth new-key TENANT | hash-key KEY   API keys for the services' RPCs
tickmesh tenant create|list|limits|disable|enable|delete|render   tenants as NATS accounts
tickmesh usage --state HOST:PORT [--since 7d]   tokens, cost and steps per graph and node
tickmesh config show [--service S]   print the effective settings, secrets masked
tickmesh migrate                  apply the state store's pending schema migrations
tickmesh serve SERVICE            run one service (router, guardrail, state, executor-pool)
tickmesh console --router HOST:PORT [--listen 127.0.0.1:8080]   the live web console
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from tickmesh.embedded import Mesh, MeshConfig
from tickmesh.runtime.lifecycle import run as run_loop
from tickmesh.runtime.settings import child_environment
from tickmesh.runtime.tracing import Tracing
from tickmesh.sdk import Client, Plan, Task, ValidationError, Worker, load_graph_file
from tickmesh.sdk._transport import create_channel
from tickmesh.sdk.errors import TickmeshError
from tickmesh.v1 import execution_pb2, state_service_pb2, state_service_pb2_grpc

from . import auth as auth_cli
from . import bench as bench_cli
from . import config as config_cli
from . import policy as policy_cli
from . import tenant as tenant_cli
from . import usage as usage_cli
from .auth import client_security
from .trace import render

SERVICES = ("router", "guardrail", "state", "executor-pool")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tickmesh", description="Run agent graphs on a gRPC mesh over NATS JetStream."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    dev = sub.add_parser("dev", help="run the embedded mesh in the foreground (Ctrl-C stops)")
    _mesh_args(dev)
    dev.add_argument(
        "--tenant-dir",
        type=Path,
        help="a tenant directory (`tickmesh tenant --dir`): tenants are NATS accounts, and "
        "the mesh serves every enabled tenant there, including ones created while it runs "
        "(--tenants is then ignored; a new directory is initialised)",
    )

    run = sub.add_parser("run", help="run a graph's lifetime end to end and print its trace")
    run.add_argument("graph", type=Path, help="graph YAML file")
    run.add_argument("--input", default="null", help="the lifetime's input, as JSON")
    run.add_argument(
        "--handlers",
        action="append",
        default=[],
        help="module or .py file whose Task/Plan objects serve the graph "
        "(default: handlers.py next to the graph)",
    )
    run.add_argument(
        "--executor",
        action="append",
        default=[],
        metavar="HANDLER=COMMAND",
        help="serve HANDLER with an executor process started by COMMAND (any language; it is "
        "given TICKMESH_POOL and TICKMESH_TENANT), instead of the Python handlers",
    )
    run.add_argument("--router", help="router host:port (default: start an embedded mesh)")
    run.add_argument("--pool", help="executor pool host:port (with --router)")
    run.add_argument("--state", help="state service host:port (with --router, for the trace)")
    run.add_argument("--tenant", default="default")
    run.add_argument("--timeout", type=float, default=300.0)
    run.add_argument("--quiet", action="store_true", help="print only the final trace")
    _mesh_args(run)

    for name, text in (("status", "show a lifetime"), ("watch", "stream a lifetime's events")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("lifetime")
        cmd.add_argument("--router", required=True, help="router host:port")
        cmd.add_argument("--tenant", default="default")
        if name == "watch":
            cmd.add_argument(
                "--after", type=int, default=0, help="resume after this event sequence"
            )

    sig = sub.add_parser("signal", help="deliver a signal to a waiting lifetime")
    sig.add_argument("lifetime")
    sig.add_argument("name", help="the signal's name, e.g. approval")
    sig.add_argument("--data", default="null", help="the signal's payload, as JSON")
    sig.add_argument("--approver", default="", help="who sends it")
    sig.add_argument("--signal-id", default="", help="makes the signal idempotent")
    sig.add_argument("--confirmation-token", default="")
    sig.add_argument("--router", required=True, help="router host:port")
    sig.add_argument("--tenant", default="default")

    fork = sub.add_parser("fork", help="start a lifetime from another's history at one execution")
    fork.add_argument("lifetime")
    fork.add_argument("execution", help="the execution id the fork continues after")
    fork.add_argument("--output", help="replace that execution's output (JSON)")
    fork.add_argument("--request-id", default="", help="makes the call idempotent")
    fork.add_argument("--router", required=True, help="router host:port")
    fork.add_argument("--tenant", default="default")

    replay = sub.add_parser("replay", help="re-drive a recorded lifetime and compare decisions")
    replay.add_argument("lifetime")
    replay.add_argument("--graph-version", type=int, default=0, help="replay against this version")
    replay.add_argument(
        "--handlers",
        action="append",
        default=[],
        help="module or .py file whose Task/Plan objects are the code run now: recorded "
        "executions of those handlers that ran other code are reported",
    )
    replay.add_argument("--router", required=True, help="router host:port")
    replay.add_argument("--state", help="state service host:port (unused: the router reads it)")
    replay.add_argument("--tenant", default="default")

    trace = sub.add_parser("trace", help="print a lifetime's executions as a tree")
    trace.add_argument("lifetime")
    trace.add_argument("--router", required=True, help="router host:port")
    trace.add_argument("--state", required=True, help="state service host:port")
    trace.add_argument("--tenant", default="default")

    graph = sub.add_parser("graph", help="graph files")
    graph_sub = graph.add_subparsers(dest="graph_command", metavar="ACTION", required=True)
    validate = graph_sub.add_parser("validate", help="check graph files")
    validate.add_argument("files", nargs="+", type=Path)

    policy_cli.add_parser(sub)
    auth_cli.add_parser(sub)

    tenant_cli.add_parser(sub)

    usage_cli.add_parser(sub)

    bench_cli.add_parser(sub)

    config_cli.add_parsers(sub)

    console = sub.add_parser("console", help="serve the live web console for one tenant")
    console.add_argument("--router", required=True, help="router host:port")
    console.add_argument("--tenant", default="default")
    console.add_argument("--listen", default="127.0.0.1:8080", help="host:port to serve on")

    serve = sub.add_parser(
        "serve", help="run one service with settings from the environment and tickmesh.yaml"
    )
    serve.add_argument("service", choices=SERVICES)
    return parser


def _port(text: str) -> int:
    # An out-of-range port would not fail: the server would bind another one.
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return port


def _mesh_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="keep NATS, SQLite and blobs here")
    parser.add_argument("--tenants", default="default", help="comma-separated tenant ids")
    parser.add_argument("--router-port", type=_port, default=0, help="0: a free port")
    parser.add_argument("--pool-port", type=_port, default=0, help="0: a free port")
    parser.add_argument(
        "--trace-exporter",
        choices=("none", "otlp", "console"),
        default="none",
        help="send the services' OpenTelemetry spans (otlp: to --trace-endpoint)",
    )
    parser.add_argument(
        "--trace-endpoint",
        help="OTLP collector (default: OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4317)",
    )


def _version() -> str:
    try:
        return f"tickmesh {metadata.version('tickmesh')}"
    except metadata.PackageNotFoundError:
        return "tickmesh (not installed)"


def _mesh_config(args: argparse.Namespace) -> MeshConfig:
    return MeshConfig(
        data_dir=args.data_dir,
        tenants=tuple(t.strip() for t in args.tenants.split(",") if t.strip()),
        router_port=args.router_port,
        pool_port=args.pool_port,
        trace_exporter=args.trace_exporter,
        trace_endpoint=args.trace_endpoint,
    )


# --- dev ------------------------------------------------------------------------


async def cmd_dev(args: argparse.Namespace, out: TextIO) -> int:
    config = _mesh_config(args)
    if args.tenant_dir is not None:
        config = dataclasses.replace(config, tenant_dir=args.tenant_dir)
    async with Mesh(config) as mesh:
        print(f"nats          {mesh.nats_url}", file=out)
        if args.tenant_dir is not None:
            print(f"tenants       {args.tenant_dir} (tickmesh tenant ... --nats-url)", file=out)
        print(f"router        {mesh.router_target}", file=out)
        print(f"executor pool {mesh.pool_target}", file=out)
        print(f"state         {mesh.state_target}", file=out)
        print(f"guardrail     {mesh.guardrail_target}", file=out)
        print(f"data          {mesh.data_dir}", file=out)
        print("tickmesh dev is running; Ctrl-C stops it", file=out, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("stopping", file=out, flush=True)
    return 0


# --- run ------------------------------------------------------------------------


def load_handlers(spec: str) -> list[Task[Any, Any] | Plan[Any]]:
    """Import a module (dotted name or .py path) and collect its Task and Plan objects."""
    module: ModuleType
    try:
        if spec.endswith(".py"):
            path = Path(spec).resolve()
            name = f"tickmesh_handlers_{abs(hash(str(path)))}"
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ValidationError(f"cannot import handlers from {spec}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(spec)
    except (ImportError, OSError) as exc:
        raise ValidationError(f"cannot import handlers from {spec}: {exc}") from exc
    found = [v for v in vars(module).values() if isinstance(v, Task | Plan)]
    if not found:
        raise ValidationError(f"{spec} defines no @task or @plan handlers")
    return found


def _read_graph(path: Path) -> Any:
    try:
        return load_graph_file(path)
    except OSError as exc:
        raise ValidationError(f"{path}: cannot read the file: {exc.strerror or exc}") from exc


async def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    graph = _read_graph(args.graph)
    specs = args.handlers or [str(args.graph.with_name("handlers.py"))]
    external = dict(_executor_spec(spec) for spec in args.executor)
    handlers = [h for spec in specs for h in load_handlers(spec) if h.name not in external]
    try:
        value = json.loads(args.input)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"--input is not JSON: {exc}") from exc
    async with contextlib.AsyncExitStack() as stack:
        if args.router:
            if not args.pool:
                raise ValidationError("--router needs --pool too (where the workers connect)")
            router, pool, state = args.router, args.pool, args.state
        else:
            mesh = await stack.enter_async_context(Mesh(_mesh_config(args)))
            router, pool, state = mesh.router_target, mesh.pool_target, mesh.state_target
            if not args.quiet:
                print(f"embedded mesh: router {router}, executor pool {pool}", file=out)
        for handler, command in external.items():
            await stack.enter_async_context(_executor_process(command, pool, args.tenant))
            if not args.quiet:
                print(f"{handler} is served by: {command}", file=out)
        client = await stack.enter_async_context(
            await Client.connect(router, tenant=args.tenant, pool=pool, security=client_security())
        )
        # The in-process executor's spans go where the services' do.
        executor_tracing = Tracing.for_service(
            "executor", exporter=args.trace_exporter, endpoint=args.trace_endpoint
        )
        stack.push_async_callback(executor_tracing.shutdown)
        await stack.enter_async_context(
            Worker(
                pool,
                tenant=args.tenant,
                tasks=handlers,
                tracer_provider=executor_tracing.provider,
                security=client_security(),
            )
        )
        stored = await client.register_graph(graph)
        handle = await client.start_lifetime(stored.id, value, version=stored.version)
        if not args.quiet:
            print(f"lifetime {handle.id} started (graph {stored.id} v{stored.version})", file=out)
        async with asyncio.timeout(args.timeout):
            async for event in handle.watch():
                if not args.quiet:
                    _print_event(event, out)
        info = await handle.describe()
        if state:
            print(file=out)
            print(await _trace(state, args.tenant, info.raw), file=out)
        if info.state != "completed":
            print(f"lifetime ended {info.state}: {info.error}", file=out)
            return 1
        from tickmesh.sdk._client import from_payload

        print(f"\noutput: {json.dumps(from_payload(info.raw.output), indent=2)}", file=out)
    return 0


def _executor_spec(spec: str) -> tuple[str, str]:
    handler, sep, command = spec.partition("=")
    if not sep or not handler or not command.strip():
        raise ValidationError(f"--executor expects HANDLER=COMMAND, got {spec!r}")
    return handler.strip(), command.strip()


@contextlib.asynccontextmanager
async def _executor_process(command: str, pool: str, tenant: str) -> AsyncIterator[None]:
    """Run an executor in another process (any language) for as long as the lifetime runs."""
    process = await asyncio.create_subprocess_exec(
        *shlex.split(command),
        env=child_environment(TICKMESH_POOL=pool, TICKMESH_TENANT=tenant),
    )
    try:
        yield
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(5):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


def _print_event(event: Any, out: TextIO) -> None:
    at = event.at.strftime("%H:%M:%S.%f")[:-3]
    node = f" {event.node_id}" if event.node_id else ""
    print(f"  {at} #{event.sequence:<4} {event.kind:<16}{node}  {event.message}", file=out)


async def _trace(state_target: str, tenant: str, lifetime: Any) -> str:
    metadata_ = (("x-tickmesh-tenant", tenant),)
    refs: list[execution_pb2.ExecutionRef] = []
    async with create_channel(state_target, security=client_security()) as channel:
        stub = state_service_pb2_grpc.StateServiceStub(channel)
        token = ""
        while True:
            response = await stub.ListExecutions(
                state_service_pb2.ListExecutionsRequest(
                    lifetime_id=lifetime.lifetime_id, page_size=1000, page_token=token
                ),
                metadata=metadata_,
                timeout=30,
            )
            refs.extend(response.executions)
            token = response.next_page_token
            if not token:
                break
    return render(lifetime, refs)


# --- status / watch / trace -------------------------------------------------------


async def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    async with await Client.connect(
        args.router, tenant=args.tenant, security=client_security()
    ) as client:
        info = await client.get_lifetime(args.lifetime)
    print(
        f"{info.lifetime_id}  {info.state.upper()}  graph {info.graph_id} v{info.graph_version}  "
        f"{info.execution_count} executions  {info.input_tokens + info.output_tokens:,} tokens  "
        f"${info.cost_micros / 1e6:.4f}" + (f"  error: {info.error}" if info.error else ""),
        file=out,
    )
    return 0


async def cmd_watch(args: argparse.Namespace, out: TextIO) -> int:
    async with await Client.connect(
        args.router, tenant=args.tenant, security=client_security()
    ) as client:
        async for event in client.watch(args.lifetime, after_sequence=args.after):
            _print_event(event, out)
    return 0


async def cmd_trace(args: argparse.Namespace, out: TextIO) -> int:
    async with await Client.connect(
        args.router, tenant=args.tenant, security=client_security()
    ) as client:
        info = await client.get_lifetime(args.lifetime)
        # Fork lineage: the origin chain, oldest last.
        lineage: list[Any] = []
        current = info.raw
        while current.HasField("fork_origin") and len(lineage) < 32:
            lineage.append(current.fork_origin)
            try:
                current = (await client.get_lifetime(current.fork_origin.lifetime_id)).raw
            except TickmeshError:
                break
    for origin in lineage:
        print(
            f"forked from {origin.lifetime_id} at execution {origin.execution_id} "
            f"(sequence {origin.sequence})",
            file=out,
        )
    print(await _trace(args.state, args.tenant, info.raw), file=out)
    return 0


def _json_arg(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{flag} is not JSON: {exc}") from exc


async def cmd_signal(args: argparse.Namespace, out: TextIO) -> int:
    data = _json_arg(args.data, "--data")
    async with await Client.connect(
        args.router, tenant=args.tenant, security=client_security()
    ) as client:
        info = await client.signal(
            args.lifetime,
            args.name,
            data,
            approver=args.approver,
            signal_id=args.signal_id,
            confirmation_token=args.confirmation_token,
        )
    print(f"{info.lifetime_id}  {info.state.upper()}  signal {args.name!r} delivered", file=out)
    return 0


async def cmd_fork(args: argparse.Namespace, out: TextIO) -> int:
    kwargs: dict[str, Any] = {"request_id": args.request_id}
    if args.output is not None:
        kwargs["replacement"] = _json_arg(args.output, "--output")
    async with await Client.connect(
        args.router, tenant=args.tenant, security=client_security()
    ) as client:
        handle = await client.fork(args.lifetime, args.execution, **kwargs)
        info = await handle.describe()
    origin = info.raw.fork_origin
    print(
        f"{info.lifetime_id}  {info.state.upper()}  forked from {origin.lifetime_id} "
        f"at {origin.execution_id} (sequence {origin.sequence})",
        file=out,
    )
    return 0


async def cmd_replay(args: argparse.Namespace, out: TextIO) -> int:
    async with await Client.connect(
        args.router, tenant=args.tenant, security=client_security()
    ) as client:
        result = await client.replay(
            args.lifetime,
            graph_version=args.graph_version,
            handlers=[h for spec in args.handlers for h in load_handlers(spec)],
        )
    verdict = "reproduced" if result.reproduced else "DIVERGED"
    print(
        f"{args.lifetime}  {verdict}  {result.decisions_checked} decisions checked "
        f"against graph v{result.graph_version}",
        file=out,
    )
    for d in result.divergences:
        node = f" {d.node_id}" if d.node_id else ""
        print(f"  #{d.sequence}{node} {d.execution_id[:12]}: {d.message}", file=out)
        print(f"      expected: {d.expected}", file=out)
        print(f"      actual:   {d.actual}", file=out)
    return 0 if result.reproduced else 1


def cmd_graph_validate(args: argparse.Namespace, out: TextIO) -> int:
    failed = 0
    for path in args.files:
        try:
            graph = load_graph_file(path)
        except OSError as exc:
            failed += 1
            print(f"{path}: cannot read the file: {exc.strerror or exc}", file=out)
            continue
        except ValidationError as exc:
            failed += 1
            for issue in exc.issues or ():
                print(str(issue), file=out)
            if not exc.issues:
                print(f"{path}: {exc}", file=out)
            continue
        print(
            f"{path}: ok (graph {graph.id}, {len(graph.nodes)} nodes, digest {graph.digest[:12]})",
            file=out,
        )
    return 1 if failed else 0


async def cmd_console(args: argparse.Namespace, out: TextIO) -> int:
    from tickmesh.console import serve

    def ready(url: str) -> None:
        print(f"tickmesh console (tenant {args.tenant}) at {url}; Ctrl-C stops it", file=out)
        out.flush()

    await serve(args.router, tenant=args.tenant, listen=args.listen, on_ready=ready)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"tickmesh.{args.service.replace('-', '_')}.server")
    settings = config_cli.load_settings(args.service)
    run_loop(module.serve(settings))
    return 0


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["bench"]:
        # The benchmark's options are its own: passed through, not parsed here.
        return bench_cli.run(given[1:], sys.stderr)
    parser = build_parser()
    args = parser.parse_args(given)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "graph":
            return cmd_graph_validate(args, out)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "policy":
            return policy_cli.run(args, out)
        if args.command == "auth":
            return auth_cli.run(args, out)
        if args.command == "tenant":
            return tenant_cli.run(args, out)
        if args.command == "usage":
            return usage_cli.run(args, out)
        if args.command == "config":
            return config_cli.cmd_config_show(args, out)
        if args.command == "migrate":
            return config_cli.cmd_migrate(args, out)
        commands = {
            "dev": cmd_dev,
            "run": cmd_run,
            "status": cmd_status,
            "watch": cmd_watch,
            "trace": cmd_trace,
            "signal": cmd_signal,
            "fork": cmd_fork,
            "replay": cmd_replay,
            "console": cmd_console,
        }
        result: int = asyncio.run(commands[args.command](args, out))
        return result
    except TickmeshError as exc:
        sys.stderr.write(f"tickmesh: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
