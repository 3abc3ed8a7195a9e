"""`tickmesh auth`: API keys for the services' RPCs, and the credentials every client
command of this CLI sends.

A key is shown once, when it is made; services store only its SHA-256 (in the file
``grpc_api_keys_file`` names), so a leaked keys file grants nothing.
"""

from __future__ import annotations

import argparse
import secrets
from typing import TextIO

from tickmesh.runtime.grpc_security import hash_key
from tickmesh.runtime.settings import ClientCredentials
from tickmesh.sdk import ChannelSecurity
from tickmesh.sdk.ids import TENANT_ID_PATTERN

KEY_PREFIX = "tm_"


def client_security() -> ChannelSecurity | None:
    """What the CLI's client commands send (:class:`ClientCredentials`, from the
    environment); None when nothing is set."""
    creds = ClientCredentials()
    if not any((creds.api_key, creds.tls_ca, creds.tls_cert, creds.tls_key)):
        return None
    return ChannelSecurity.from_files(
        api_key=creds.api_key, ca=creds.tls_ca, cert=creds.tls_cert, key=creds.tls_key
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    auth = sub.add_parser("auth", help="API keys for the services' RPCs")
    commands = auth.add_subparsers(dest="auth_command", required=True)
    new = commands.add_parser("new-key", help="make a key; print it and its keys-file entry")
    new.add_argument("tenant", help="the tenant the key acts for ('*': a service key)")
    hashed = commands.add_parser("hash-key", help="print the SHA-256 a keys file stores")
    hashed.add_argument("key")


def run(args: argparse.Namespace, out: TextIO) -> int:
    if args.auth_command == "hash-key":
        print(hash_key(args.key), file=out)
        return 0
    tenant = args.tenant
    if tenant != "*" and not TENANT_ID_PATTERN.fullmatch(tenant):
        print(f"error: {tenant!r} is not a tenant id (or '*')", file=out)
        return 2
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    print(f"key (shown once; give it to the client): {key}", file=out)
    print("keys file entry (grpc_api_keys_file):", file=out)
    print(f'"{tenant}": ["{hash_key(key)}"]', file=out)
    return 0
