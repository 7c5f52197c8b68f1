#!/usr/bin/env python3
"""prefork: a pre-fork worker pool sharing one listening unix socket, plus a
socketpair from the parent to each worker.

    python3 prefork.py DIR WORKERS

The parent listens on DIR/pool.sock, forks WORKERS workers that all accept on
it, and keeps one end of a socketpair to each.  A client line "ping N" is
answered by some worker with "pong N from worker K request R" (R counts that
worker's requests); "stats" makes the parent ask every worker, through its
socketpair, how many requests it served, and answer "served A+B+...=TOTAL".
Prints "ready" when all workers run.
"""
import os
import select
import socket
import sys

d, n = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_UNIX)
srv.bind(os.path.join(d, "pool.sock"))
srv.listen(16)
srv.setblocking(False)
links = []
for k in range(1, n + 1):
    mine, theirs = socket.socketpair()
    if os.fork() == 0:
        mine.close()
        served = 0
        while True:
            # A worker answers clients, and the parent on its socketpair.
            r, _, _ = select.select([srv, theirs], [], [])
            if theirs in r:
                theirs.recv(16)
                theirs.sendall(f"{served}\n".encode())
                continue
            try:
                conn, _ = srv.accept()  # non-blocking: another worker may win
            except BlockingIOError:
                continue
            conn.setblocking(True)
            with conn, conn.makefile("rw") as f:
                line = f.readline().strip()
                served += 1
                if line == "stats":
                    f.write("ask the parent\n")
                else:
                    f.write(f"pong {line.split()[1]} from worker {k} request {served}\n")
    theirs.close()
    links.append(mine)
print("ready", flush=True)
ctl = socket.socket(socket.AF_UNIX)
ctl.bind(os.path.join(d, "ctl.sock"))
ctl.listen(4)
while True:
    conn, _ = ctl.accept()
    with conn, conn.makefile("rw") as f:
        f.readline()
        counts = []
        for link in links:
            link.sendall(b"?")
            counts.append(int(link.recv(16).decode().strip() or 0))
        f.write(f"served {'+'.join(map(str, counts))}={sum(counts)}\n")
