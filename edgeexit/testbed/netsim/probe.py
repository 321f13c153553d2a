"""A tiny TCP throughput probe for checking an emulated link (used by the namespace tests).

    python -m edgeexit.testbed.netsim.probe sink HOST:PORT           # prints "listening", then one JSON line per run
    python -m edgeexit.testbed.netsim.probe source HOST:PORT NBYTES  # sends NBYTES and closes

The sink accepts one connection, reads until EOF and prints ``{"bytes": n, "seconds": s, "mbit": r}`` where
``s`` runs from the first to the last byte received.
"""

from __future__ import annotations

import json
import socket
import sys
import time

from edgeexit.hostport import parse_hostport

CHUNK = 64 * 1024


def sink(host: str, port: int) -> dict[str, float]:
    with socket.create_server((host, port)) as srv:
        print("listening", flush=True)
        conn, _ = srv.accept()
        with conn:
            n, first = 0, None
            while data := conn.recv(CHUNK):
                first = first or time.monotonic()
                n += len(data)
            seconds = time.monotonic() - (first or time.monotonic())
    return {"bytes": n, "seconds": seconds, "mbit": n * 8 / seconds / 1e6 if seconds else 0.0}


def source(host: str, port: int, nbytes: int, connect_timeout: float = 10.0) -> None:
    deadline = time.monotonic() + connect_timeout
    while True:  # the sink may still be starting in the other namespace
        try:
            conn = socket.create_connection((host, port), timeout=connect_timeout)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with conn:
        conn.settimeout(None)
        block = b"\0" * CHUNK
        sent = 0
        while sent < nbytes:
            sent += conn.send(block[: min(CHUNK, nbytes - sent)])
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # wait for the sink to close: everything was received


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "sink":
        print(json.dumps(sink(*parse_hostport(argv[1], "sink address"))), flush=True)
        return 0
    if len(argv) == 3 and argv[0] == "source":
        source(*parse_hostport(argv[1], "source address"), int(argv[2]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
