#!/usr/bin/env python3
"""reconnect: a network client that takes part in its checkpoint and restart.

    python3 reconnect.py PORT TICKS

Connects to 127.0.0.1:PORT, says "hello first", then sends "tick N" every
100 ms (and prints it).  With crelf hooks (hooks/crelf_hooks.py): before a
checkpoint it says "bye" and closes the connection (no TCP socket is left to
checkpoint); after the checkpoint (resume) or in the restarted process
(restart) it connects again, says "hello again after <event>" and sends the
ticks it could not send meanwhile.  Ends with "done".
"""
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "hooks"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import crelf_hooks  # noqa: E402

port, ticks = int(sys.argv[1]), int(sys.argv[2])
lock = threading.Lock()
conn = None
pending: list[str] = []


def connect(greeting: str) -> None:
    global conn
    with lock:
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(f"hello {greeting}\n".encode())
        while pending:
            conn.sendall(pending.pop(0).encode())


def disconnect() -> None:
    global conn
    with lock:
        if conn is not None:
            conn.sendall(b"bye\n")
            conn.close()
            conn = None


def send(line: str) -> None:
    with lock:
        if conn is None:
            pending.append(line)
        else:
            conn.sendall(line.encode())


connect("first")
crelf_hooks.install(before_checkpoint=disconnect,
                    after_resume=lambda: connect("again after resume"),
                    after_restart=lambda: connect("again after restart"))
for n in range(1, ticks + 1):
    time.sleep(0.1)
    send(f"tick {n}\n")
    print(f"tick {n}", flush=True)
disconnect()
print("done", flush=True)
