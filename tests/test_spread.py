"""service/spread.py: each process's count of connections, and the decision to send one on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.spread import Spread


def connect(spread: Spread) -> bool:
    """A new connection, as the servers count it: True where it is sent on (and then not counted)."""
    sent = spread.opened()
    if sent:
        spread.closed()
    return sent


def test_a_process_keeps_at_most_its_share(tmp_path: Path) -> None:
    me, other = os.getpid(), os.getppid()  # two live processes
    a, b = Spread(tmp_path, "grpc", me), Spread(tmp_path, "grpc", other)
    Spread(tmp_path, "http", 1).opened()  # another kind of connection: never counted with these
    assert [connect(a) for _ in range(3)] == [False, True, True] and a.held == 1  # at most 0 + 1
    assert b.others() == [1] and [connect(b) for _ in range(4)] == [False, False, True, True] and b.held == 2
    assert a.others() == [2] and [connect(a) for _ in range(3)] == [False, False, True] and a.held == 3
    b.closed()
    b.closed()
    assert connect(a) and a.others() == [0]  # b's connections closed: a keeps its 3, takes no 4th
    for _ in range(80):
        b.opened()
    assert b.held == 80 and [connect(a) for _ in range(88)].count(True) == 1 and a.held == 90  # 90 <= 80 + 10
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ghost = Spread(tmp_path, "grpc", int(gone.stdout))  # its process has exited: its file is not counted
    ghost.opened()
    assert a.others() == [80]
    b.close()
    assert a.others() == [] and not connect(a)  # alone: no process to send it to
    assert not (tmp_path / f"grpc-{other}").exists()
