/*
 * tree: a parent with two forked children.
 *
 *   tree [TICKS]     TICKS default 0 = forever
 *
 * Child K (K = 1, 2) prints "child K tick N" every 100 ms for N = 1..TICKS,
 * then exits with status 10+K.  The parent prints "parent tick N" every
 * 100 ms for N = 1..TICKS, then waitpid()s both children and prints
 * "child 1 exited STATUS" and "child 2 exited STATUS" (STATUS = exit status,
 * i.e. 11 and 12; "child K signaled SIG" if it was killed) as the last two
 * lines, then exits 0.  Tick lines of different processes interleave in any
 * order.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

static void loop(const char *fmt_prefix, int k, long ticks)
{
    for (long n = 1; ticks <= 0 || n <= ticks; n++) {
        sleep_ms(100);
        if (k)
            printf("%s %d tick %ld\n", fmt_prefix, k, n);
        else
            printf("%s tick %ld\n", fmt_prefix, n);
        fflush(stdout);
    }
}

int main(int argc, char **argv)
{
    long ticks = argc > 1 ? atol(argv[1]) : 0;
    pid_t kids[2];

    setvbuf(stdout, NULL, _IOLBF, 0);

    for (int k = 1; k <= 2; k++) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            loop("child", k, ticks);
            exit(10 + k);
        }
        kids[k - 1] = pid;
    }

    loop("parent", 0, ticks);

    /* reap both first, then report: the two "exited" lines are always the
     * last two lines of the output */
    int st[2];
    for (int k = 1; k <= 2; k++) {
        while (waitpid(kids[k - 1], &st[k - 1], 0) < 0) {
            if (errno != EINTR) {
                perror("waitpid");
                return 1;
            }
        }
    }
    for (int k = 1; k <= 2; k++) {
        if (WIFEXITED(st[k - 1]))
            printf("child %d exited %d\n", k, WEXITSTATUS(st[k - 1]));
        else
            printf("child %d signaled %d\n", k, WTERMSIG(st[k - 1]));
        fflush(stdout);
    }
    return 0;
}
