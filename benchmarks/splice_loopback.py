#!/usr/bin/env python
"""What relaying a stream costs on loopback, by copying through Python or by splice(2).

    .venv/bin/python benchmarks/splice_loopback.py [--gib 1] [--rounds 3]

Three threads of one process, over loopback TCP: a source sends ``--gib`` GiB in 0.5 MiB
writes (an instance at a time, as Orthanc does); a relay passes the stream on to a client,
either copying (``recv_into`` a reused 1 MiB buffer, ``sendall``: the two copies of any relay
in Python) or splicing (socket to pipe to socket, 1 MiB pipe, ``SPLICE_F_MORE``: what
``sharing.zero_copy`` does); the client reads it with ``recv_into`` 64 KiB at a time, as
httpx does. Each thread's own CPU (``time.thread_time``: user and kernel) per GB, and the
rate, taking turns, ``--rounds`` times each.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import statistics
import threading
import time

BLOCK = 512 * 1024
PIPE = 1024 * 1024


def one_transfer(mode: str, total: int) -> dict[str, float]:
    cpu: dict[str, float] = {}
    source_listener = socket.create_server(("127.0.0.1", 0))
    relay_listener = socket.create_server(("127.0.0.1", 0))

    def source() -> None:
        connection, _ = source_listener.accept()
        block, sent = os.urandom(BLOCK), 0
        started = time.thread_time()
        while sent < total:
            connection.sendall(block)
            sent += BLOCK
        cpu["source"] = time.thread_time() - started
        connection.close()

    def relay() -> None:
        downstream, _ = relay_listener.accept()
        upstream = socket.create_connection(source_listener.getsockname())
        started = time.thread_time()
        if mode == "copy":
            buffer = memoryview(bytearray(PIPE))
            while count := upstream.recv_into(buffer):
                downstream.sendall(buffer[:count])
        else:
            pipe_read, pipe_write = os.pipe2(os.O_CLOEXEC)
            fcntl.fcntl(pipe_write, fcntl.F_SETPIPE_SZ, PIPE)
            flags = os.SPLICE_F_MOVE | os.SPLICE_F_MORE
            while count := os.splice(upstream.fileno(), pipe_write, PIPE, flags=os.SPLICE_F_MOVE):
                while count:
                    count -= os.splice(pipe_read, downstream.fileno(), count, flags=flags)
            os.close(pipe_read)
            os.close(pipe_write)
        cpu["relay"] = time.thread_time() - started
        downstream.close()
        upstream.close()

    threads = [threading.Thread(target=source), threading.Thread(target=relay)]
    for thread in threads:
        thread.start()
    client = socket.create_connection(relay_listener.getsockname())
    buffer = memoryview(bytearray(64 * 1024))
    received, started, clock = 0, time.thread_time(), time.monotonic()
    while count := client.recv_into(buffer):
        received += count
    elapsed = time.monotonic() - clock
    cpu["client"] = time.thread_time() - started
    for thread in threads:
        thread.join()
    client.close()
    source_listener.close()
    relay_listener.close()
    gb = received / 1e9
    return {"mb_per_s": received / elapsed / 1e6} | {k: v / gb for k, v in cpu.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    total = int(args.gib * 1024**3) // BLOCK * BLOCK
    results: dict[str, list[dict[str, float]]] = {"copy": [], "splice": []}
    for _ in range(args.rounds):
        for mode in results:
            results[mode].append(one_transfer(mode, total))
    print(
        f"\n| relay, {args.gib:g} GiB, median of {args.rounds} | MB/s | CPU s/GB: relay | client |"
    )
    print("|---|---:|---:|---:|")
    for mode, rows in results.items():
        cells = [statistics.median(r[key] for r in rows) for key in ("mb_per_s", "relay", "client")]
        print(f"| {mode} | {cells[0]:.0f} | {cells[1]:.2f} | {cells[2]:.2f} |")


if __name__ == "__main__":
    main()
