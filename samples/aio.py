#!/usr/bin/env python3
"""aio: an asyncio program (epoll + the event loop's unix socketpair self-pipe).

    python3 aio.py TICKS

A producer wakes the loop every 100 ms through call_soon_threadsafe (a byte
on the loop's socketpair); the consumer prints "aio tick N total=T".
"""
import asyncio, os, sys
async def main(n):
    loop = asyncio.get_running_loop()
    q = asyncio.Queue()
    async def producer():
        for i in range(1, n + 1):
            await asyncio.sleep(0.1)
            loop.call_soon_threadsafe(q.put_nowait, i)   # wakes the loop via its self-pipe
    asyncio.ensure_future(producer())
    total = 0
    for _ in range(n):
        i = await q.get(); total += i
        print(f"aio tick {i} total={total}", flush=True)
asyncio.run(main(int(sys.argv[1])))
