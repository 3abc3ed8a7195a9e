"""A service's NATS connection against external nats-servers set up as deployments are.

Each test starts its own nats-server processes (config files in ``tmp_path``, free
loopback ports) with one authentication mode, TLS, or a cluster, and connects the
way ``serve()`` does, through :func:`connect_nats`. A good credential must give a
working connection; a bad one must end the first connect within
``nats_connect_timeout_s`` with an error that names the server and the reason and
carries no secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from tests.support.nats_configs import (
    NatsServerProcess,
    NatsServers,
    cluster_block,
    make_tls_files,
    new_user_nkey,
    nkey_block,
    require_nats_server,
    server_config,
    tls_block,
    token_block,
    user_password_block,
)
from tests.support.ports import free_port
from tickmesh.router.config import RouterSettings
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.lifecycle import connect_nats
from tickmesh.runtime.streams import ensure_tenant
from tickmesh.sdk.errors import ConfigError, TransportError

REFUSE_WITHIN_S = 1.0
"""nats_connect_timeout_s for the connections that must fail."""
SLACK_S = 1.0
"""How much later than nats_connect_timeout_s a refused first connect may end."""
USER, PASSWORD = "svc", "pw-5d1c9e0a7b"
TOKEN = "tok-3f8a2b61c4e9"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[NatsServers]:
    require_nats_server()
    started = NatsServers(tmp_path / "nats")
    try:
        yield started
    finally:
        started.stop_all()


def _settings(url: str, **fields: Any) -> RouterSettings:
    fields.setdefault("nats_connect_timeout_s", REFUSE_WITHIN_S)
    return RouterSettings(nats_url=url, **fields)


def _with_userinfo(url: str, userinfo: str) -> str:
    return url.replace("nats://", f"nats://{userinfo}@", 1)


@contextlib.asynccontextmanager
async def _connected(settings: RouterSettings) -> AsyncIterator[NatsClient]:
    nc = await connect_nats(settings, "test")
    try:
        yield nc
    finally:
        await nc.close()


async def _assert_pub_sub(nc: NatsClient) -> None:
    subject = f"ext.{uuid.uuid4().hex}"
    sub = await nc.subscribe(subject)
    await nc.publish(subject, b"hello")
    msg = await sub.next_msg(timeout=2)
    assert msg.data == b"hello"
    await sub.unsubscribe()


async def _refused(settings: RouterSettings) -> str:
    """The message of the TransportError that ends the first connect, checked for timing."""
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        await connect_nats(settings, "test")
    elapsed = time.monotonic() - started
    assert elapsed < settings.nats_connect_timeout_s + SLACK_S, f"refused after {elapsed:.2f} s"
    message = str(caught.value)
    assert message.startswith("cannot connect to NATS at "), message
    return message


# -- user and password ---------------------------------------------------------------------


async def test_user_password_in_settings_connects_and_uses_jetstream(
    servers: NatsServers, tmp_path: Path
) -> None:
    server = servers.start(
        "userpass",
        server_config(
            "userpass",
            jetstream_dir=tmp_path / "js",
            blocks=(user_password_block(USER, PASSWORD),),
        ),
    )
    async with _connected(_settings(server.url, nats_user=USER, nats_password=PASSWORD)) as nc:
        await _assert_pub_sub(nc)
        js = tm_nats.jetstream(nc)
        await js.add_stream(name="EXT", subjects=["ext.js.>"])
        acks = await tm_nats.publish_batch(
            js, [tm_nats.Outgoing("ext.js.a", b"1"), tm_nats.Outgoing("ext.js.b", b"2")]
        )
        assert [ack.seq for ack in acks] == [1, 2]


async def test_user_password_wrong_password_is_refused_in_time(servers: NatsServers) -> None:
    server = servers.start(
        "userpass", server_config("userpass", blocks=(user_password_block(USER, PASSWORD),))
    )
    message = await _refused(_settings(server.url, nats_user=USER, nats_password="wrong-pw-77"))
    assert server.url in message
    assert "Authorization Violation" in message
    assert "wrong-pw-77" not in message
    assert PASSWORD not in message


async def test_user_password_in_the_url_connects(servers: NatsServers) -> None:
    server = servers.start(
        "userpass", server_config("userpass", blocks=(user_password_block(USER, PASSWORD),))
    )
    async with _connected(_settings(_with_userinfo(server.url, f"{USER}:{PASSWORD}"))) as nc:
        await _assert_pub_sub(nc)
        # The password was moved out of the URL into the connect options.
        assert nc.connected_url is not None
        assert PASSWORD not in nc.connected_url.geturl()


async def test_user_password_wrong_in_the_url_is_refused_and_redacted(
    servers: NatsServers,
) -> None:
    server = servers.start(
        "userpass", server_config("userpass", blocks=(user_password_block(USER, PASSWORD),))
    )
    message = await _refused(_settings(_with_userinfo(server.url, f"{USER}:wrong-pw-77")))
    assert _with_userinfo(server.url, f"{USER}:***") in message
    assert "Authorization Violation" in message
    assert "wrong-pw-77" not in message


async def test_no_credentials_for_a_server_that_wants_them_is_refused(
    servers: NatsServers,
) -> None:
    server = servers.start(
        "userpass", server_config("userpass", blocks=(user_password_block(USER, PASSWORD),))
    )
    message = await _refused(_settings(server.url))
    assert server.url in message
    assert "Authorization Violation" in message


# -- token ---------------------------------------------------------------------------------


async def test_token_connects(servers: NatsServers) -> None:
    server = servers.start("token", server_config("token", blocks=(token_block(TOKEN),)))
    async with _connected(_settings(server.url, nats_token=TOKEN)) as nc:
        await _assert_pub_sub(nc)
    async with _connected(_settings(_with_userinfo(server.url, TOKEN))) as nc:
        await _assert_pub_sub(nc)


async def test_token_wrong_is_refused_in_time(servers: NatsServers) -> None:
    server = servers.start("token", server_config("token", blocks=(token_block(TOKEN),)))
    message = await _refused(_settings(server.url, nats_token="tok-wrong-0042"))
    assert server.url in message
    assert "Authorization Violation" in message
    assert "tok-wrong-0042" not in message
    assert TOKEN not in message


async def test_token_wrong_in_the_url_is_redacted(servers: NatsServers) -> None:
    server = servers.start("token", server_config("token", blocks=(token_block(TOKEN),)))
    message = await _refused(_settings(_with_userinfo(server.url, "tok-wrong-0042")))
    assert _with_userinfo(server.url, "***") in message
    assert "Authorization Violation" in message
    assert "tok-wrong-0042" not in message


# -- NKey ----------------------------------------------------------------------------------


async def test_nkey_seed_file_connects(servers: NatsServers, tmp_path: Path) -> None:
    user = new_user_nkey()
    seed_file = tmp_path / "user.nk"
    seed_file.write_text(user.seed + "\n")
    server = servers.start("nkey", server_config("nkey", blocks=(nkey_block(user.public_key),)))
    async with _connected(_settings(server.url, nats_nkey_seed=str(seed_file))) as nc:
        await _assert_pub_sub(nc)


async def test_nkey_unknown_to_the_server_is_refused_in_time(
    servers: NatsServers, tmp_path: Path
) -> None:
    known, stranger = new_user_nkey(), new_user_nkey()
    seed_file = tmp_path / "stranger.nk"
    seed_file.write_text(stranger.seed)
    server = servers.start("nkey", server_config("nkey", blocks=(nkey_block(known.public_key),)))
    message = await _refused(_settings(server.url, nats_nkey_seed=str(seed_file)))
    assert server.url in message
    assert "Authorization Violation" in message
    assert stranger.seed not in message
    assert known.seed not in message


async def test_nkey_missing_seed_file_is_a_config_error(
    servers: NatsServers, tmp_path: Path
) -> None:
    user = new_user_nkey()
    server = servers.start("nkey", server_config("nkey", blocks=(nkey_block(user.public_key),)))
    missing = tmp_path / "absent.nk"
    with pytest.raises(ConfigError, match=f"nats_nkey_seed={missing}: no such file"):
        await connect_nats(_settings(server.url, nats_nkey_seed=str(missing)), "test")


# -- TLS -----------------------------------------------------------------------------------


async def test_mutual_tls_connects_by_ip_and_by_name(servers: NatsServers, tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "tls")
    server = servers.start("tls", server_config("tls", blocks=(tls_block(files),)))
    tls = {
        "nats_tls_ca": str(files.ca_cert),
        "nats_tls_cert": str(files.client_cert),
        "nats_tls_key": str(files.client_key),
    }
    async with _connected(_settings(server.url, **tls)) as nc:
        await _assert_pub_sub(nc)
    by_name = server.url.replace("127.0.0.1", "localhost")
    async with _connected(_settings(by_name, **tls)) as nc:
        await _assert_pub_sub(nc)


async def test_tls_without_the_client_certificate_is_refused_in_time(
    servers: NatsServers, tmp_path: Path
) -> None:
    files = make_tls_files(tmp_path / "tls")
    server = servers.start("tls", server_config("tls", blocks=(tls_block(files),)))
    message = await _refused(_settings(server.url, nats_tls_ca=str(files.ca_cert)))
    assert server.url in message
    assert "certificate required" in message


async def test_tls_with_a_ca_that_did_not_sign_the_server_is_refused_in_time(
    servers: NatsServers, tmp_path: Path
) -> None:
    files = make_tls_files(tmp_path / "tls")
    other = make_tls_files(tmp_path / "other")
    server = servers.start("tls", server_config("tls", blocks=(tls_block(files),)))
    message = await _refused(
        _settings(
            server.url,
            nats_tls_ca=str(other.ca_cert),
            nats_tls_cert=str(files.client_cert),
            nats_tls_key=str(files.client_key),
        )
    )
    assert server.url in message
    assert "certificate verify failed" in message


async def test_tls_missing_ca_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        await connect_nats(
            _settings(f"nats://127.0.0.1:{free_port()}", nats_tls_ca=str(missing)), "test"
        )
    assert time.monotonic() - started < 0.5
    assert str(missing) in str(caught.value)


async def test_tls_unreadable_client_key_is_a_config_error_naming_it(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "tls")
    with pytest.raises(ConfigError) as caught:
        await connect_nats(
            _settings(
                f"nats://127.0.0.1:{free_port()}",
                nats_tls_ca=str(files.ca_cert),
                nats_tls_cert=str(files.client_cert),
                nats_tls_key=str(files.ca_cert),  # a certificate, not a key
            ),
            "test",
        )
    assert str(files.client_cert) in str(caught.value)
    assert str(files.ca_cert) in str(caught.value)


# -- cluster -------------------------------------------------------------------------------


def _start_cluster(servers: NatsServers, *blocks: str) -> list[NatsServerProcess]:
    """Three nodes; the second and third route to the first and learn each other from it."""
    seed = servers.start("n1", server_config("n1", blocks=(cluster_block("c1"), *blocks)))
    assert seed.route_port is not None
    others = [
        servers.start(
            name,
            server_config(name, blocks=(cluster_block("c1", routes=(seed.route_port,)), *blocks)),
        )
        for name in ("n2", "n3")
    ]
    return [seed, *others]


async def _until(condition: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``condition()`` until true; the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            pytest.fail(f"{what}: not within {within:g} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def _request_until_answered(nc: NatsClient, subject: str, within: float) -> bytes:
    """Retries while the responder's interest is still on its way across the routes."""
    async with asyncio.timeout(within):
        while True:
            try:
                reply = await nc.request(subject, b"ping", timeout=0.5)
            except (NoRespondersError, NatsTimeoutError):
                await asyncio.sleep(0.01)
            else:
                data: bytes = reply.data
                return data


@pytest.mark.parametrize(
    ("auth", "credentials"),
    [
        pytest.param(False, "", id="open"),
        # nats-py sends a URL's userinfo only to that URL's server, so a failover to a
        # discovered node would log in with nothing unless connect() lifts it.
        pytest.param(True, "url", id="credentials-in-url"),
        pytest.param(True, "settings", id="credentials-in-settings"),
    ],
)
async def test_cluster_client_learns_the_nodes_and_fails_over_when_its_node_dies(
    servers: NatsServers, capsys: pytest.CaptureFixture[str], auth: bool, credentials: str
) -> None:
    blocks = (user_password_block(USER, PASSWORD),) if auth else ()
    nodes = _start_cluster(servers, *blocks)
    seed, responder_node = nodes[0], nodes[1]

    def settings_for(node: NatsServerProcess) -> RouterSettings:
        if credentials == "url":
            return _settings(_with_userinfo(node.url, f"{USER}:{PASSWORD}"))
        if credentials == "settings":
            return _settings(node.url, nats_user=USER, nats_password=PASSWORD)
        return _settings(node.url)

    subject = f"ext.ping.{uuid.uuid4().hex}"

    async def pong(msg: Msg) -> None:
        await msg.respond(b"pong " + msg.data)

    async with (
        _connected(settings_for(seed)) as nc,
        _connected(settings_for(responder_node)) as responder,
    ):
        assert nc.connected_url is not None
        assert nc.connected_url.port == seed.client_port
        others = {node.client_port for node in nodes[1:]}
        await _until(
            lambda: others <= {url.port for url in nc.discovered_servers},
            within=5,
            what="the client learning the other cluster nodes",
        )
        await _assert_pub_sub(nc)
        await responder.subscribe(subject, cb=pong)
        await responder.flush()
        assert await _request_until_answered(nc, subject, within=5) == b"pong ping"

        seed.stop(kill=True)
        killed = time.monotonic()
        reconnect_s = await _until(
            lambda: (
                nc.is_connected and nc.connected_url is not None and nc.connected_url.port in others
            ),
            within=5,
            what="the client reconnecting to a surviving node",
        )
        assert await _request_until_answered(nc, subject, within=5) == b"pong ping"
        answered_s = time.monotonic() - killed
        assert answered_s < 5
        await _assert_pub_sub(nc)
        label = f"credentials in {credentials}" if credentials else "no auth"
        with capsys.disabled():
            print(  # noqa: T201 - the figure is the point of this test
                f"\nNATS cluster failover ({label}): reconnected "
                f"{reconnect_s * 1000:.0f} ms after SIGKILL of its node, "
                f"request/reply answered after {answered_s * 1000:.0f} ms"
            )


# -- unreachable ---------------------------------------------------------------------------


async def test_unreachable_server_is_refused_in_time_with_the_last_error() -> None:
    port = free_port()
    message = await _refused(_settings(f"nats://127.0.0.1:{port}"))
    assert f"cannot connect to NATS at nats://127.0.0.1:{port}:" in message
    assert f"not connected within {REFUSE_WITHIN_S:g} s" in message
    assert "last error:" in message
    assert "Connect call failed" in message or "refused" in message.lower()


async def test_unreachable_cluster_names_every_server() -> None:
    urls = [f"nats://127.0.0.1:{free_port()}", f"nats://127.0.0.1:{free_port()}"]
    message = await _refused(_settings(",".join(urls)))
    assert f"cannot connect to NATS at {urls[0]}, {urls[1]}:" in message


# -- replicated streams ----------------------------------------------------------------------


async def _until_ok(attempt: Callable[[], Any], within: float, what: str) -> Any:
    """Retry ``await attempt()`` while the cluster is electing leaders."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: still failing after {within:g} s: {exc!r}")
            await asyncio.sleep(0.1)


async def test_a_tenant_on_a_3_node_cluster_keeps_its_records_when_a_stream_leader_dies(
    servers: NatsServers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With nats_replicas=3 every stream and bucket lives on all three servers, so killing
    the node that leads the work stream loses no message and stalls publishing briefly."""
    # A JetStream cluster needs its routes configured up front: fixed route ports for all.
    route_ports = [free_port() for _ in range(3)]
    routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in route_ports)
    nodes = [
        servers.start(
            name,
            server_config(
                name,
                jetstream_dir=tmp_path / name,
                blocks=(f"cluster {{ name: c2, listen: 127.0.0.1:{port}, routes: [{routes}] }}",),
            ),
        )
        for name, port in zip(("js1", "js2", "js3"), route_ports, strict=True)
    ]
    settings = _settings(",".join(n.url for n in nodes), nats_replicas=3, nats_connect_timeout_s=5)
    tenant = f"rep_{uuid.uuid4().hex[:8]}"
    async with _connected(settings) as nc:
        js = tm_nats.jetstream(nc)
        names = await _until_ok(
            lambda: ensure_tenant(js, tenant, replicas=settings.nats_replicas),
            within=20,
            what="creating the tenant's streams on the cluster",
        )
        for stream in (
            names.work_stream,
            names.exec_stream,
            names.ref_stream,
            names.evt_stream,
            names.dlq_stream,
            f"KV_{names.router_bucket}",
            f"KV_{names.policy_bucket}",
        ):
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3, stream
            assert info.cluster is not None
            assert len(info.cluster.replicas or []) == 2, stream

        subject = names.work("task", "h")
        await _until_ok(lambda: js.publish(subject, b"before"), within=10, what="first publish")
        info = await js.stream_info(names.work_stream)
        assert info.cluster is not None
        leader = next(n for n in nodes if n.name == info.cluster.leader)
        leader.stop(kill=True)
        killed = time.monotonic()
        await _until_ok(lambda: js.publish(subject, b"after"), within=15, what="publish after")
        recovered_s = time.monotonic() - killed
        info = await _until_ok(
            lambda: js.stream_info(names.work_stream), within=10, what="stream info"
        )
        assert info.state.messages == 2
        assert info.cluster is not None
        assert info.cluster.leader != leader.name
    with capsys.disabled():
        print(  # noqa: T201 - the figure is the point of this test
            f"\nR3 work stream: leader {leader.name} killed, publishing again after "
            f"{recovered_s * 1000:.0f} ms, no message lost"
        )


async def test_a_connection_reads_message_headers_with_the_runtime_parser(
    nats_server: EmbeddedNats,
) -> None:
    nc = await tm_nats.connect(nats_server.url, name="headers")
    try:
        assert nc._parse_header_lines is tm_nats.parse_header_lines
        sub = await nc.subscribe("hdr.test")
        await nc.publish("hdr.test", b"x", headers={"Tickmesh-Tenant": "acme", "K": "a: b"})
        msg = await sub.next_msg(timeout=2)
        assert msg.headers == {"Tickmesh-Tenant": "acme", "K": "a: b"}
    finally:
        await nc.close()
