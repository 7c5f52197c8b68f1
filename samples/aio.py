#!/usr/bin/env python3
"""aio: asyncio programs (epoll, the event loop's unix socketpair self-pipe,
and application data over a socket.socketpair()).

    python3 aio.py TICKS          the loop woken through its self-pipe
    python3 aio.py pair ROUNDS    two tasks talking over a socketpair

TICKS: a producer wakes the loop every 100 ms through call_soon_threadsafe (a
byte on the loop's socketpair); the consumer prints "aio tick N total=T".

pair: two tasks share a socket.socketpair().  The client sends "ping N" every
30 ms with loop.sock_sendall, without waiting; the server reads it through
asyncio streams (open_unix_connection(sock=...)) more slowly (60 ms a line),
so pings queue up in the socket, and answers "pong N*N"; the client's reader
(loop.sock_recv) prints "aio pair N: pong N*N sum=S" for each.  Only the
client's reader prints, so the output is a pure function of ROUNDS; it ends
with "aio pair done".
"""
import asyncio
import socket
import sys


async def ticks(n):
    loop = asyncio.get_running_loop()
    q = asyncio.Queue()

    async def producer():
        for i in range(1, n + 1):
            await asyncio.sleep(0.1)
            loop.call_soon_threadsafe(q.put_nowait, i)   # wakes the loop via its self-pipe
    task = asyncio.ensure_future(producer())
    total = 0
    for _ in range(n):
        i = await q.get()
        total += i
        print(f"aio tick {i} total={total}", flush=True)
    await task


async def pair(rounds):
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)

    async def client_send():
        for i in range(1, rounds + 1):
            await loop.sock_sendall(a, f"ping {i}\n".encode())
            await asyncio.sleep(0.03)

    async def client_recv():
        buf, total, seen = b"", 0, 0
        while seen < rounds:
            data = await loop.sock_recv(a, 4096)
            if not data:
                raise SystemExit("server closed early")
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                word, value = line.decode().split()
                seen += 1
                total += int(value)
                print(f"aio pair {seen}: {word} {value} sum={total}", flush=True)

    async def server():
        reader, writer = await asyncio.open_unix_connection(sock=b)
        for _ in range(rounds):
            line = await reader.readline()
            n = int(line.split()[1])
            await asyncio.sleep(0.06)
            writer.write(f"pong {n * n}\n".encode())
            await writer.drain()
        writer.close()

    await asyncio.gather(client_send(), client_recv(), server())
    print("aio pair done", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "pair":
        asyncio.run(pair(int(sys.argv[2])))
    else:
        asyncio.run(ticks(int(sys.argv[1])))
