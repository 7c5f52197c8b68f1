#!/usr/bin/env python3
"""eventloop: a select.epoll event loop over an eventfd, a timerfd, a signalfd
and an inotify watch (the kernel objects asyncio, Node and Go runtimes use).

    python3 eventloop.py DIR [TICKS]     TICKS default 30

A timerfd fires every 100 ms; each expiration is tick N: the loop writes N to
an eventfd and prints "tick N eventfd=V" when the eventfd reads back V.  At
tick 10 it creates DIR/made-at-10 (the inotify watch on DIR reports it:
"inotify IN_CREATE made-at-10"); at tick 15 it sends itself SIGUSR1, blocked
and read through the signalfd ("signalfd SIGUSR1").  Output is a pure
function of TICKS.  Ends with "done".
"""
import ctypes
import os
import select
import signal
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)


class itimerspec(ctypes.Structure):
    _fields_ = [("i_sec", ctypes.c_long), ("i_nsec", ctypes.c_long),
                ("v_sec", ctypes.c_long), ("v_nsec", ctypes.c_long)]


def main(argv):
    watch_dir = argv[1]
    ticks = int(argv[2]) if len(argv) > 2 else 30
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    tfd = libc.timerfd_create(1, os.O_NONBLOCK)  # CLOCK_MONOTONIC
    libc.timerfd_settime(tfd, 0, ctypes.byref(itimerspec(0, 100_000_000, 0, 100_000_000)), None)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    mask = ctypes.c_uint64(1 << (signal.SIGUSR1 - 1))
    sfd = libc.signalfd(-1, ctypes.byref(mask), os.O_NONBLOCK)
    ifd = libc.inotify_init1(os.O_NONBLOCK)
    libc.inotify_add_watch(ifd, watch_dir.encode(), 0x100)  # IN_CREATE
    ep = select.epoll()
    for fd in (efd, tfd, sfd, ifd):
        ep.register(fd, select.EPOLLIN)
    n = 0
    while n < ticks:
        for fd, _ in sorted(ep.poll()):
            if fd == tfd:
                for _ in range(struct.unpack("Q", os.read(tfd, 8))[0]):
                    n += 1
                    os.eventfd_write(efd, n)
                    if n == 10:
                        open(os.path.join(watch_dir, "made-at-10"), "w").close()
                    if n == 15:
                        os.kill(os.getpid(), signal.SIGUSR1)
            elif fd == efd:
                print(f"tick {n} eventfd={os.eventfd_read(efd)}", flush=True)
            elif fd == sfd:
                signo = struct.unpack("I", os.read(sfd, 128)[:4])[0]
                print(f"signalfd {signal.Signals(signo).name}", flush=True)
            elif fd == ifd:
                data = os.read(ifd, 4096)
                _wd, ev_mask, _cookie, ln = struct.unpack("iIII", data[:16])
                name = data[16:16 + ln].rstrip(b"\0").decode()
                print(f"inotify {'IN_CREATE' if ev_mask & 0x100 else hex(ev_mask)} {name}",
                      flush=True)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
