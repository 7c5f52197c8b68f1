/*
 * bigheap: large resident + large reserved-but-untouched memory.
 *
 *   bigheap [TOUCHED_MIB [RESERVED_MIB]]   defaults 64 and 1024
 *
 * Maps TOUCHED_MIB MiB anonymous memory and memsets every page with a
 * non-zero byte ((page_index % 255) + 1), and maps RESERVED_MIB MiB with
 * mmap(PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE) that
 * is never touched.  Prints
 *
 *   touched ADDR MIB
 *   reserved ADDR MIB
 *   ready
 *
 * (ADDR in 0x-hex) and then "alive N" (N = 1, 2, ...) once per second,
 * forever.  Each alive line re-checks the touched pattern of one page and
 * exits 2 (message on stderr) if it is wrong.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096

int main(int argc, char **argv)
{
    long touched = argc > 1 ? atol(argv[1]) : 64;
    long reserved = argc > 2 ? atol(argv[2]) : 1024;
    size_t tbytes = (size_t)(touched > 0 ? touched : 0) << 20;
    size_t rbytes = (size_t)(reserved > 0 ? reserved : 0) << 20;
    unsigned char *t = NULL, *r = NULL;

    setvbuf(stdout, NULL, _IOLBF, 0);

    if (tbytes) {
        t = mmap(NULL, tbytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (t == MAP_FAILED) {
            perror("mmap touched");
            return 1;
        }
        for (size_t p = 0; p < tbytes / PAGE; p++)
            memset(t + p * PAGE, (int)(p % 255) + 1, PAGE);
    }
    if (rbytes) {
        r = mmap(NULL, rbytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (r == MAP_FAILED) {
            perror("mmap reserved");
            return 1;
        }
    }

    printf("touched %p %ld\n", (void *)t, touched);
    printf("reserved %p %ld\n", (void *)r, reserved);
    printf("ready\n");
    fflush(stdout);

    size_t npages = tbytes / PAGE;
    for (unsigned long n = 1;; n++) {
        struct timespec ts = { 1, 0 };
        while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
            ;
        if (npages) {
            size_t p = (n * 7919) % npages;
            unsigned char want = (unsigned char)((p % 255) + 1);
            if (t[p * PAGE] != want || t[p * PAGE + PAGE - 1] != want) {
                fprintf(stderr, "bigheap: page %zu corrupted\n", p);
                return 2;
            }
        }
        printf("alive %lu\n", n);
        fflush(stdout);
    }
}
