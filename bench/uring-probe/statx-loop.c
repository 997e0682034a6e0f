/* statx-loop: the FUSE round trip of a mounted file system, one GETATTR per call
 * (AT_STATX_FORCE_SYNC makes the kernel ask the server even while its cached attributes are
 * valid). Usage: statx-loop PATH [calls] [clients]; prints microseconds per call (wall time
 * over all clients' calls: with 2 clients, a throughput figure).
 * Build: cc -O2 -pthread -o statx-loop statx-loop.c */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>

static const char *path;
static long calls;

static void *client(void *arg)
{
	long n = (long)arg;
	struct statx stx;
	for (long i = 0; i < n; i++) {
		if (statx(AT_FDCWD, path, AT_STATX_FORCE_SYNC, STATX_BASIC_STATS, &stx) != 0) {
			perror("statx");
			exit(1);
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s PATH [calls] [clients]\n", argv[0]);
		return 2;
	}
	path = argv[1];
	calls = argc > 2 ? atol(argv[2]) : 100000;
	int clients = argc > 3 ? atoi(argv[3]) : 1;
	client((void *)1000L); /* warm up */
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	pthread_t t[64];
	for (int i = 0; i < clients; i++)
		pthread_create(&t[i], NULL, client, (void *)(calls / clients));
	for (int i = 0; i < clients; i++)
		pthread_join(t[i], NULL);
	clock_gettime(CLOCK_MONOTONIC, &b);
	double us = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1e3;
	printf("%.2f us/call (%ld calls, %d clients)\n", us / calls, calls, clients);
	return 0;
}
