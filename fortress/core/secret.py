"""The server secret: ``auth.secret``, or 32 random bytes (hex) kept in ``<state_dir>/secret``.

API key hashes and the audit hash chain are both HMACs under it, so both layers read it here.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from fortress.config import FortressConfig


class SecretMissing(RuntimeError):
    """No ``auth.secret`` and no ``<state_dir>/secret``: nothing signed before can be checked."""


def secret_path(config: FortressConfig) -> Path:
    return Path(config.state_dir).expanduser() / "secret"


def load_secret(config: FortressConfig, create: bool = True) -> bytes:
    """The HMAC secret: ``auth.secret``, else the contents of ``<state_dir>/secret``.

    The file is shared with the access layer (API key hashes). Whoever comes first creates it
    exclusively (32 random bytes as hex, mode 0600); the other reads it, waiting briefly if it
    was created a moment ago and is still empty. ``create=False`` (the CLI) never makes one: a
    fresh secret could not verify anything.
    """
    if config.auth.secret:
        return config.auth.secret.encode()
    path = secret_path(config)
    if not create:
        if not path.exists():
            raise SecretMissing(
                f"no audit secret: {path} does not exist and auth.secret (FORTRESS__AUTH__SECRET) is unset"
            )
        return _read_secret(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return _read_secret(path)
    # Write a private temp file, then link it into place: the secret appears with its content
    # or not at all (a crash cannot leave an empty secret), and only one creator wins.
    value = secrets.token_hex(32).encode()
    tmp = private_temp_file(path, value)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_secret(path)  # another process (or the access layer) was first
    finally:
        tmp.unlink(missing_ok=True)
    return value


def _read_secret(path: Path) -> bytes:
    deadline = time.monotonic() + 5
    while True:
        value = path.read_bytes().strip()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SecretMissing(f"{path} is empty: delete it or set auth.secret")
        time.sleep(0.01)  # created by another process that has not written it yet


def private_temp_file(path: Path, data: bytes) -> Path:
    """A new file beside ``path``, readable by this user only, holding ``data`` on disk (fsynced).
    The caller links or renames it into place, and removes it when that fails."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp
