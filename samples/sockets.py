#!/usr/bin/env python3
"""sockets: unix sockets with data in flight, for checkpoint/restart tests.

    python3 sockets.py DIR

Makes a stream socketpair with unread data queued in both directions, a
datagram socketpair with two unread datagrams, and a listening socket at
DIR/listen.sock; prints "ready" and waits until DIR/go exists.  Then it reads
everything that was queued, connects to its own listening socket, accepts the
connection, exchanges a line over it, prints what it saw and "done".
"""
import os
import socket
import sys
import time

d = sys.argv[1]
a, b = socket.socketpair()
a.sendall(b"a->b one;")
a.sendall(b"a->b two;")
b.sendall(b"b->a")
d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
d1.send(b"datagram 1")
d1.send(b"datagram 2")
srv = socket.socket(socket.AF_UNIX)
srv.bind(os.path.join(d, "listen.sock"))
srv.listen()
print("ready", flush=True)
while not os.path.exists(os.path.join(d, "go")):
    time.sleep(0.05)
print("b got", b.recv(100), flush=True)
print("a got", a.recv(100), flush=True)
print("d2 got", d2.recv(100), d2.recv(100), flush=True)
c = socket.socket(socket.AF_UNIX)
c.connect(os.path.join(d, "listen.sock"))
conn, _ = srv.accept()
c.sendall(b"hello listener\n")
print("listener got", conn.recv(100), flush=True)
print("done", flush=True)
