/*
 * unsupported: a ticker holding state crelf cannot checkpoint.
 *
 *   unsupported uring|perf [TICKS]
 *
 * Creates an io_uring instance (io_uring_setup) or a perf event
 * (perf_event_open on itself, software task clock), prints
 * "ready fd=N" (N < 0: -errno, the call failed), then "tick N" every 100 ms
 * for TICKS ticks (0 = forever) and exits 0.  Used by the crcheck/crrun tests.
 */
#define _GNU_SOURCE
#include <linux/perf_event.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "uring";
    long ticks = argc > 2 ? atol(argv[2]) : 0;
    long fd;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (strcmp(what, "perf") == 0) {
        struct perf_event_attr attr;
        memset(&attr, 0, sizeof attr);
        attr.size = sizeof attr;
        attr.type = PERF_TYPE_SOFTWARE;
        attr.config = PERF_COUNT_SW_TASK_CLOCK;
        attr.exclude_kernel = 1;
        fd = syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0);
    } else {
        unsigned char params[120];   /* struct io_uring_params */
        memset(params, 0, sizeof params);
        fd = syscall(425 /* io_uring_setup */, 8, params);
    }
    printf("ready fd=%ld\n", fd < 0 ? -(long)errno : fd);
    struct timespec ts = {0, 100 * 1000 * 1000};
    for (long n = 1; ticks == 0 || n <= ticks; n++) {
        nanosleep(&ts, NULL);
        printf("tick %ld\n", n);
    }
    return 0;
}
