/*
 * genstamp: the test guest's consistency workload (built by qmpdump's testbed with the host's
 * gcc, -static -O2, into the initramfs).
 *
 * Usage: genstamp MIB
 *
 * Maps MIB MiB of anonymous memory and, as fast as it can, passes over its pages in order,
 * stamping the pass number (the generation) into the head and then the tail of each page. A
 * dump taken at one instant sees every page of the buffer with head == tail, and generations
 * G for the pages before the writer's position and G - 1 from there on: one clean cut. A dump
 * copied while the writer runs sees torn pages or several cuts. qmpdump.testbed.cutcheck
 * checks a dump for that.
 *
 * Page layout (little-endian 64-bit words):
 *   word 0    magic "QDGENST1"
 *   word 1    this run's id (printed at start)
 *   word 2    page index in the buffer
 *   word 3    generation (head)
 *   word 511  generation (tail)
 *
 * Prints "QMPDUMP-WRITER run=ID pages=N" once, then about every 200 ms
 * "QMPDUMP-GEN gen=G pages=P" (P: pages stamped since start) for throughput measurements.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_WORDS 512
#define MAGIC 0x3154534e45474451ULL /* "QDGENST1" little-endian */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    unsigned long mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
    size_t pages = mib * 256;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t run = ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)ts.tv_nsec ^ (uint64_t)getpid();
    volatile uint64_t *buf = mmap(NULL, pages * PAGE_WORDS * 8, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (buf == MAP_FAILED) {
        perror("genstamp: mmap");
        return 1;
    }
    for (size_t i = 0; i < pages; i++) {
        volatile uint64_t *p = buf + i * PAGE_WORDS;
        p[0] = MAGIC;
        p[1] = run;
        p[2] = i;
        p[3] = 0;
        p[PAGE_WORDS - 1] = 0;
    }
    printf("QMPDUMP-WRITER run=%016llx pages=%zu\n", (unsigned long long)run, pages);
    fflush(stdout);
    uint64_t gen = 0, stamped = 0;
    double last = now();
    for (;;) {
        gen++;
        for (size_t i = 0; i < pages; i++) {
            volatile uint64_t *p = buf + i * PAGE_WORDS;
            p[3] = gen;             /* head first, */
            p[PAGE_WORDS - 1] = gen; /* then tail: a page copied in between is torn */
        }
        stamped += pages;
        double t = now();
        if (t - last >= 0.2) {
            printf("QMPDUMP-GEN gen=%llu pages=%llu\n", (unsigned long long)gen,
                   (unsigned long long)stamped);
            fflush(stdout);
            last = t;
        }
    }
}
