"""Interval timers across a --kill checkpoint and a restart.  A periodic
ITIMER_REAL whose SIGALRM is pending (blocked, or not taken yet) reads as
value 0: the kernel arms it again only when that SIGALRM is dequeued.
Restored as "value 0" it was disarmed for good (zdtm timers failed so one
run in three: "timer 2 stuck").  The program blocks SIGALRM until the timer
has expired, is checkpointed then, and afterwards counts its alarms."""
from __future__ import annotations

from helpers import build_c, require_root
from roundtrip import same_after_restart

PROG = r'''
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <unistd.h>

static volatile int alarms;
static void on_alarm(int s) { (void)s; alarms++; }

int main(void) {
    sigset_t alrm;
    sigemptyset(&alrm);
    sigaddset(&alrm, SIGALRM);
    signal(SIGALRM, on_alarm);
    sigprocmask(SIG_BLOCK, &alrm, NULL);
    struct itimerval tv = {{0, 20000}, {0, 1000}}, now;
    setitimer(ITIMER_REAL, &tv, NULL);
    usleep(50000);                      /* expired: SIGALRM pending, the timer idle */
    getitimer(ITIMER_REAL, &now);
    printf("pending, value %ld, interval %ld\n", now.it_value.tv_usec,
           now.it_interval.tv_usec);
    const char *go = getenv("GO");      /* ticks 0-9, then on until the file GO exists */
    for (int i = 0; i < 10 || (go && access(go, F_OK)); i++) {
        if (i < 10) { printf("tick %d\n", i); fflush(stdout); }
        usleep(20000);
    }
    sigprocmask(SIG_UNBLOCK, &alrm, NULL);
    for (int i = 0; i < 40; i++)
        usleep(10000);                  /* 400 ms at least: 20 alarms more or less */
    printf("alarms after unblocking: %s\n", alarms >= 5 ? "periodic" : "stopped");
    return 0;
}
'''


def test_periodic_real_timer_with_its_sigalrm_pending(procs, tmp_path):
    require_root()
    prog = build_c(tmp_path, "alrm", PROG)
    ref = same_after_restart(procs, tmp_path, [prog], "alrm")
    assert b"pending, value 0, interval 20000\n" in ref, ref
    assert ref.endswith(b"alarms after unblocking: periodic\n"), ref
