#!/usr/bin/env python3
"""pyworker: CPython workload with 2 threading.Thread workers.

    python3 pyworker.py [TICKS]     TICKS default 0 = forever

Every 100 ms the main thread hands tick N (N = 1..TICKS) to both workers
through queues, collects their results and prints

    py tick N total=T

where T is the running sum of both workers' results for ticks 1..N, so the
output is a pure function of N.  At the end the workers are stopped and
joined, "joined" is printed and the exit status is 0.
"""
import queue
import sys
import threading
import time


def work_a(n):
    return sum(range(n * 100))


def work_b(n):
    return sum(i * i % 1009 for i in range(n, n + 500))


def worker(fn, inq, outq):
    while True:
        n = inq.get()
        if n is None:
            return
        outq.put(fn(n))


def main(argv):
    ticks = int(argv[1]) if len(argv) > 1 else 0
    pairs = []
    for name, fn in (("worker-a", work_a), ("worker-b", work_b)):
        inq, outq = queue.Queue(), queue.Queue()
        t = threading.Thread(target=worker, args=(fn, inq, outq), name=name)
        t.start()
        pairs.append((t, inq, outq))

    total = 0
    n = 1
    while ticks <= 0 or n <= ticks:
        time.sleep(0.1)
        for _, inq, _ in pairs:
            inq.put(n)
        for _, _, outq in pairs:
            total += outq.get()
        print(f"py tick {n} total={total}", flush=True)
        n += 1

    for _, inq, _ in pairs:
        inq.put(None)
    for t, _, _ in pairs:
        t.join()
    print("joined", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
