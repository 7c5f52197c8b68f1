/*
 * mt_sync: threads that really synchronise (mutexes, condition variables,
 * pthread_join), with output that depends on what they compute.
 *
 *   mt_sync [TICKS [MS]]     TICKS default 40, MS tick period default 50
 *
 * One producer pushes PER_TICK values per tick into a ring of RING slots
 * (mutex + not_full/not_empty condvars); it waits on a gate condvar until main
 * opens tick N.  Two consumers pop them (FIFO order, hashed under the ring
 * lock), transform each value and add it to a total under a second mutex,
 * signalling main (condvar) every PER_TICK values.  Each tick main opens the
 * gate, waits until the tick's values are all consumed, starts a short-lived
 * helper thread, pthread_join()s it for its result and prints
 *
 *   tick N consumed=C sum=HEX order=HEX helper=HEX
 *
 * At the end main stops everyone, joins the producer and the consumers and
 * prints "joined consumed=C sum=HEX", exit 0.  Which consumer takes which
 * value varies; nothing printed depends on it, so the output is a pure
 * function of TICKS.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RING 8
#define PER_TICK 37

static uint64_t mix(uint64_t x)  /* splitmix64 finaliser */
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static pthread_mutex_t ring_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t not_full = PTHREAD_COND_INITIALIZER;
static pthread_cond_t not_empty = PTHREAD_COND_INITIALIZER;
static uint64_t ring[RING];
static int head, count;
static uint64_t order_hash = 1469598103934665603ULL;   /* pop order, under ring_lock */

static pthread_mutex_t acc_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t progress = PTHREAD_COND_INITIALIZER;
static uint64_t total;
static long consumed;

static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate = PTHREAD_COND_INITIALIZER;
static long allowed;

static int done;          /* under ring_lock: no more values will come */
static long ticks;

static void *producer(void *arg)
{
    (void)arg;
    for (long n = 1; n <= ticks; n++) {
        pthread_mutex_lock(&gate_lock);
        while (allowed < n)
            pthread_cond_wait(&gate, &gate_lock);
        pthread_mutex_unlock(&gate_lock);
        for (int k = 0; k < PER_TICK; k++) {
            uint64_t v = mix((uint64_t)n * 1000 + (uint64_t)k);
            pthread_mutex_lock(&ring_lock);
            while (count == RING)
                pthread_cond_wait(&not_full, &ring_lock);
            ring[(head + count) % RING] = v;
            count++;
            pthread_cond_signal(&not_empty);
            pthread_mutex_unlock(&ring_lock);
        }
    }
    pthread_mutex_lock(&ring_lock);
    done = 1;
    pthread_cond_broadcast(&not_empty);
    pthread_mutex_unlock(&ring_lock);
    return NULL;
}

static void *consumer(void *arg)
{
    long mine = 0;
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&ring_lock);
        while (count == 0 && !done)
            pthread_cond_wait(&not_empty, &ring_lock);
        if (count == 0) {
            pthread_mutex_unlock(&ring_lock);
            break;
        }
        uint64_t v = ring[head];
        head = (head + 1) % RING;
        count--;
        order_hash = (order_hash ^ v) * 0x100000001b3ULL;
        pthread_cond_signal(&not_full);
        pthread_mutex_unlock(&ring_lock);

        uint64_t w = v;                  /* some work outside the locks */
        for (int i = 0; i < 200; i++)
            w = mix(w ^ (uint64_t)i);
        mine++;

        pthread_mutex_lock(&acc_lock);
        total += w;
        consumed++;
        if (consumed % PER_TICK == 0)
            pthread_cond_signal(&progress);
        pthread_mutex_unlock(&acc_lock);
    }
    return (void *)mine;
}

static void *helper(void *arg)
{
    uint64_t h = (uint64_t)(uintptr_t)arg;
    for (int i = 0; i < 1000; i++)
        h = mix(h + (uint64_t)i);
    return (void *)(uintptr_t)h;
}

static void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

int main(int argc, char **argv)
{
    ticks = argc > 1 ? atol(argv[1]) : 40;
    long ms = argc > 2 ? atol(argv[2]) : 50;
    pthread_t prod, cons[2];
    int rc;

    setvbuf(stdout, NULL, _IOLBF, 0);
    if ((rc = pthread_create(&prod, NULL, producer, NULL)) != 0 ||
        (rc = pthread_create(&cons[0], NULL, consumer, NULL)) != 0 ||
        (rc = pthread_create(&cons[1], NULL, consumer, NULL)) != 0) {
        fprintf(stderr, "pthread_create: %s\n", strerror(rc));
        return 1;
    }
    for (long n = 1; n <= ticks; n++) {
        sleep_ms(ms);
        pthread_mutex_lock(&gate_lock);
        allowed = n;
        pthread_cond_broadcast(&gate);
        pthread_mutex_unlock(&gate_lock);

        pthread_mutex_lock(&acc_lock);
        while (consumed < n * PER_TICK)
            pthread_cond_wait(&progress, &acc_lock);
        uint64_t sum = total;
        long c = consumed;
        pthread_mutex_unlock(&acc_lock);
        pthread_mutex_lock(&ring_lock);
        uint64_t order = order_hash;
        pthread_mutex_unlock(&ring_lock);

        pthread_t h;
        void *res;
        if ((rc = pthread_create(&h, NULL, helper, (void *)(uintptr_t)(sum ^ (uint64_t)n))) ||
            (rc = pthread_join(h, &res))) {
            fprintf(stderr, "helper: %s\n", strerror(rc));
            return 1;
        }
        printf("tick %ld consumed=%ld sum=%016llx order=%016llx helper=%016llx\n", n, c,
               (unsigned long long)sum, (unsigned long long)order,
               (unsigned long long)(uintptr_t)res);
    }
    long per[2] = {0, 0};
    void *res;
    if (pthread_join(prod, NULL))
        return 1;
    for (int i = 0; i < 2; i++) {
        if (pthread_join(cons[i], &res))
            return 1;
        per[i] = (long)res;
    }
    if (per[0] + per[1] != consumed) {
        fprintf(stderr, "mt_sync: consumers took %ld + %ld of %ld values\n", per[0], per[1],
                consumed);
        return 2;
    }
    printf("joined consumed=%ld sum=%016llx\n", consumed, (unsigned long long)total);
    return 0;
}
