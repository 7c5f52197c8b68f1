/*
 * ticker: single-threaded, deterministic heap mutator.
 *
 *   ticker [TICKS [MIB [MS]]]   TICKS default 0 = forever, MIB default 4,
 *                               MS tick period default 100
 *
 * Allocates MIB MiB of heap, fills it deterministically, then each tick
 * N = 1..TICKS mutates a few pages (chosen from N), malloc()s/free()s a small
 * scratch buffer and prints
 *
 *   tick N checksum=HEX       (16 hex digits, checksum of the whole heap area)
 *
 * followed by "done" at the end (exit 0).  The output is a pure function of
 * (N, MIB): an interrupted-and-restarted run prints byte-identical output to
 * an uninterrupted one.  Pacing uses clock_gettime(CLOCK_MONOTONIC) only to
 * subtract the work time from the sleep, so a clock jump after a restore
 * cannot cause bursts or long stalls.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PAGE 4096
#define MUTATIONS_PER_TICK 4

static uint64_t mix(uint64_t x)  /* splitmix64 finaliser */
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t checksum(const uint64_t *w, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ w[i]) * 0x100000001b3ULL;
    return h;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int main(int argc, char **argv)
{
    long ticks = argc > 1 ? atol(argv[1]) : 0;
    long mib = argc > 2 ? atol(argv[2]) : 4;
    long ms = argc > 3 ? atol(argv[3]) : 100;
    if (mib < 1)
        mib = 1;
    if (ms < 0)
        ms = 0;

    setvbuf(stdout, NULL, _IOLBF, 0);

    size_t bytes = (size_t)mib << 20;
    size_t words = bytes / 8, pages = bytes / PAGE, wpp = PAGE / 8;
    uint64_t *heap = malloc(bytes);
    if (!heap) {
        perror("malloc");
        return 1;
    }
    for (size_t i = 0; i < words; i++)
        heap[i] = mix(i);

    for (long n = 1; ticks <= 0 || n <= ticks; n++) {
        double t0 = now_ms();

        for (int k = 0; k < MUTATIONS_PER_TICK; k++) {
            uint64_t r = mix(((uint64_t)n << 8) | (uint64_t)k);
            uint64_t *pg = heap + (r % pages) * wpp;
            for (size_t j = 0; j < wpp; j += 8)
                pg[j] = mix(pg[j] ^ r ^ j);
        }

        /* a little malloc/free traffic; its content feeds the checksum */
        size_t sz = 64 + (size_t)(n % 32) * 64;
        unsigned char *scratch = malloc(sz);
        if (!scratch) {
            perror("malloc");
            return 1;
        }
        for (size_t j = 0; j < sz; j++)
            scratch[j] = (unsigned char)(n + j);
        uint64_t extra = 0;
        for (size_t j = 0; j < sz; j++)
            extra += scratch[j];
        free(scratch);

        heap[(size_t)n % words] ^= extra;
        printf("tick %ld checksum=%016llx\n", n,
               (unsigned long long)checksum(heap, words));
        fflush(stdout);

        double left = ms - (now_ms() - t0);
        if (left > ms)
            left = ms;
        if (left > 0) {
            struct timespec ts = { (time_t)(left / 1000),
                                   (long)((left - (long)(left / 1000) * 1000) * 1e6) };
            while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
                ;
        }
    }
    printf("done\n");
    fflush(stdout);
    free(heap);
    return 0;
}
