"""Generated request ids: ``req-`` and 24 hex digits, unique within a process, across forked
children and across processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from fortress.gateway.app import new_request_id

FORMAT = re.compile(r"req-[0-9a-f]{24}")


def test_request_ids_keep_their_format_and_do_not_repeat() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert all(FORMAT.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_and_another_process_use_other_prefixes() -> None:
    mine = new_request_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what a worker forked from this process would generate
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    other = subprocess.run(
        [sys.executable, "-c", "from fortress.gateway.app import new_request_id as n; print(n())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for rid in (child, other):
        assert FORMAT.fullmatch(rid)
        assert rid[4:16] != mine[4:16]  # the per-process random part
