"""Real Redis and PostgreSQL servers for tests, on free ports, in throwaway directories.

Missing binaries fail the test with the command that installs them (``make test`` does):
these tests are never skipped.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from helpers import free_port


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port} within {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class RedisServer:
    """``redis-server`` bound to 127.0.0.1 on a free port, without persistence."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server") or (
            "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
        )
        if binary is None:
            pytest.fail("redis-server is missing: run `make test` (or apt-get install redis-server)")
        self.port = port or free_port()
        self.log = workdir / f"redis-{self.port}.log"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(workdir), "--logfile", str(self.log)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, self.log)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        _stop(self.proc)


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        which = shutil.which("postgres")
        if which is None:
            pytest.fail("PostgreSQL is missing: run `make test` (or apt-get install postgresql)")
        return Path(which).parent
    return Path(found[-1]).parent


class PostgresServer:
    """A fresh PostgreSQL cluster (initdb) on a free port with database ``fortress``.

    PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` OS user, in a
    directory that user owns (pytest's tmp dirs are private to root).
    """

    database = "fortress"

    def __init__(self) -> None:
        bindir = postgres_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="fortress-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.log = self.dir / "postgres.log"
        run_as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            run_as = ["runuser", "-u", "postgres", "--"]
        initdb = [*run_as, str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"]
        out = subprocess.run([*initdb, "-E", "UTF8", "--no-sync"], capture_output=True, text=True)
        if out.returncode != 0:
            pytest.fail(f"initdb failed: {out.stderr[-2000:]}")
        cmd = [*run_as, str(bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        cmd += ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}"]
        cmd += ["-c", "fsync=off", "-c", "max_connections=200"]
        self._logfh = open(self.log, "ab")  # closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._logfh, stderr=subprocess.STDOUT)
        try:
            _wait_port(self.port, self.proc, self.log)
            self._create_database()
        except Exception:
            self.stop()
            raise
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    def _create_database(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(
                    host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
                ) as conn:
                    conn.execute(f"CREATE DATABASE {self.database}")
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        _stop(self.proc)
        self._logfh.close()
        shutil.rmtree(self.dir, ignore_errors=True)
