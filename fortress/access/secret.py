"""The server secret that keys are hashed with: ``auth.secret``, or ``<state_dir>/secret``."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from fortress.config import FortressConfig


def secret_path(config: FortressConfig) -> Path:
    return Path(config.state_dir).expanduser() / "secret"


def load_secret(config: FortressConfig) -> bytes:
    """The HMAC secret. Generated once (0600, created exclusively so that two processes
    starting together agree) when ``auth.secret`` is not set."""
    if config.auth.secret:
        return config.auth.secret.encode()
    path = secret_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path)
    tmp_value = secrets.token_hex(32).encode()
    with os.fdopen(fd, "wb") as fh:
        fh.write(tmp_value)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp_value


def _read(path: Path) -> bytes:
    # Another process may have created the file a moment ago and not written it yet.
    deadline = time.monotonic() + 5
    while True:
        value = path.read_bytes().strip()
        if value or time.monotonic() > deadline:
            if not value:
                raise RuntimeError(f"{path} is empty: delete it or set auth.secret")
            return value
        time.sleep(0.01)
