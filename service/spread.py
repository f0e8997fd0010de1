"""How many connections each server process holds, so that one holding more than its share sends new ones on.

The server processes listen on one port with SO_REUSEPORT (service/serve.py), and the kernel gives each new
connection to one of them by a hash of its addresses: a client's connections, which live for its whole run,
can land mostly on one process, which then runs big batches while the other runs small ones, dearer an image.
Each process writes how many connections it holds to a file of its own in a directory the processes share; a
process that, with a new connection, holds more than one more than the process holding fewest (an eighth more,
with many) serves that connection's first request and then asks the client to go (HTTP/1.1: `connection:
close` on the answer; gRPC: GOAWAY after the first call's answer). The client's next request opens another
connection, which the kernel may give to another process. The connection is not counted from the moment it is
asked to go.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class Spread:
    """This process's count of one kind of connection, in the shared directory, beside the other processes'."""

    def __init__(self, directory: Path, kind: str, pid: int | None = None):
        """kind: the connections counted ("grpc"); pid: this process (the files' owner), by default os.getpid()."""
        directory.mkdir(exist_ok=True)
        self.directory, self.kind, self.pid = directory, kind, pid or os.getpid()
        self.held = 0
        self._fd = os.open(directory / f"{kind}-{self.pid}", os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        self._write()

    def _write(self) -> None:
        if self._fd >= 0:  # else closed: the server has stopped
            os.pwrite(self._fd, self.held.to_bytes(4, "little"), 0)

    def opened(self) -> bool:
        """A new connection, counted: True where this process now holds more than its share, and the connection
        should go elsewhere: more than one more than the process holding fewest, or with many connections more
        than an eighth more (a thousand connections hashed over two processes fall within a few percent of
        even, and sending them on would only add reconnections under load)."""
        self.held += 1
        self._write()
        others = self.others()
        return bool(others) and self.held > min(others) + max(1, min(others) // 8)

    def closed(self) -> None:
        self.held -= 1
        self._write()

    def others(self) -> list[int]:
        """What the other live processes hold (a file whose process is gone is not counted)."""
        counts = []
        for entry in os.scandir(self.directory):
            kind, _, pid = entry.name.rpartition("-")
            if kind != self.kind or not pid.isdigit() or int(pid) == self.pid or not _alive(int(pid)):
                continue
            with contextlib.suppress(OSError), open(entry.path, "rb") as f:
                counts.append(int.from_bytes(f.read(4), "little"))
        return counts

    def close(self) -> None:
        os.close(self._fd)
        self._fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.directory / f"{self.kind}-{self.pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shared(directory: str | None, kind: str) -> Spread | None:
    """The `kind` connections of the server's processes, counted in `directory` (the metrics directory they
    share); None for a server of one process (directory None)."""
    return Spread(Path(directory) / "connections", kind) if directory else None
