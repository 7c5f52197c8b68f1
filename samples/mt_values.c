/*
 * mt_values: multi-threaded workload with known values for gdb-based checks.
 *
 *   mt_values [TICKS]     TICKS ticks (default 0 = run forever)
 *
 * Main + 3 pthreads (worker_alpha/beta/gamma, thread names "alpha", "beta",
 * "gamma").  Each worker loops: ++crelf_counter_<name>; crelf_wait_point()
 * (nanosleep 50 ms).  Main prints one line per 100 ms:
 *
 *   tick N sum=S        N = 1..TICKS, S = crelf_heap_checksum() + N
 *
 * then stops the workers, pthread_join()s them, prints "joined", exits 0.
 *
 * Known values:
 *   crelf_magic          == 0x1234abcd5678ef00 (initialised, rewritten at run time)
 *   crelf_counter_global == last tick number printed (set by main)
 *   crelf_banner         == "crelf-banner-v1" (strcpy at run time)
 *   crelf_heap           malloc(1 MiB): "HEAPSTART" then byte i = (i*7+3)&0xff
 *   stack_marker         (local of main) == 0x5ca1ab1e
 * Main checks stack_marker/crelf_magic/crelf_banner every tick and exits 2
 * (message on stderr) if any is wrong.
 * The heap checksum is the plain sum of all bytes as unsigned chars
 * (CRELF_HEAP_SUM below); it never changes after initialisation.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CRELF_HEAP_SIZE (1024 * 1024)

long crelf_magic = 0x1234abcd5678ef00;
volatile long crelf_counter_global;
char crelf_banner[64];
char *crelf_heap;
volatile long crelf_counter_alpha, crelf_counter_beta, crelf_counter_gamma;
volatile int crelf_stop;

__attribute__((noinline)) static void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

__attribute__((noinline)) void crelf_wait_point(void)
{
    struct timespec ts = { 0, 50 * 1000000L };
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
    __asm__ volatile("" ::: "memory");  /* keep a real frame + call */
}

__attribute__((noinline)) void *worker_alpha(void *arg)
{
    (void)arg;
    while (!crelf_stop) {
        crelf_counter_alpha++;
        crelf_wait_point();
    }
    return NULL;
}

__attribute__((noinline)) void *worker_beta(void *arg)
{
    (void)arg;
    while (!crelf_stop) {
        crelf_counter_beta++;
        crelf_wait_point();
    }
    return NULL;
}

__attribute__((noinline)) void *worker_gamma(void *arg)
{
    (void)arg;
    while (!crelf_stop) {
        crelf_counter_gamma++;
        crelf_wait_point();
    }
    return NULL;
}

__attribute__((noinline)) unsigned long crelf_heap_checksum(void)
{
    unsigned long s = 0;
    for (size_t i = 0; i < CRELF_HEAP_SIZE; i++)
        s += (unsigned char)crelf_heap[i];
    return s;
}

int main(int argc, char **argv)
{
    volatile long stack_marker = 0x5ca1ab1e;
    long ticks = argc > 1 ? atol(argv[1]) : 0;
    void *(*fns[3])(void *) = { worker_alpha, worker_beta, worker_gamma };
    const char *names[3] = { "alpha", "beta", "gamma" };
    pthread_t th[3];

    setvbuf(stdout, NULL, _IOLBF, 0);

    *(volatile long *)&crelf_magic = 0x1234abcd5678ef00;
    strcpy(crelf_banner, "crelf-banner-v1");
    crelf_heap = malloc(CRELF_HEAP_SIZE);
    if (!crelf_heap) {
        perror("malloc");
        return 1;
    }
    for (size_t i = 0; i < CRELF_HEAP_SIZE; i++)
        crelf_heap[i] = (char)((i * 7 + 3) & 0xff);
    memcpy(crelf_heap, "HEAPSTART", 9);

    for (int i = 0; i < 3; i++) {
        int rc = pthread_create(&th[i], NULL, fns[i], NULL);
        if (rc) {
            fprintf(stderr, "pthread_create: %s\n", strerror(rc));
            return 1;
        }
        pthread_setname_np(th[i], names[i]);
    }

    for (long n = 1; ticks <= 0 || n <= ticks; n++) {
        sleep_ms(100);
        crelf_counter_global = n;
        printf("tick %ld sum=%lu\n", n, crelf_heap_checksum() + (unsigned long)n);
        fflush(stdout);
        /* self-check: a bad restore shows up as exit status 2 */
        if (stack_marker != 0x5ca1ab1e || crelf_magic != 0x1234abcd5678ef00 ||
            strcmp(crelf_banner, "crelf-banner-v1") != 0) {
            fprintf(stderr, "mt_values: known values corrupted\n");
            return 2;
        }
    }

    crelf_stop = 1;
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    printf("joined\n");
    fflush(stdout);
    free(crelf_heap);
    return 0;
}
