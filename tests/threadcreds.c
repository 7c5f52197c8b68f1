/*
 * Threads with credentials of their own (tests/test_thread_creds.py).
 *
 * Credentials belong to a thread: the raw setresuid/setresgid/setgroups/
 * capset/prctl(PR_SET_SECUREBITS) syscalls change only the calling thread
 * (glibc's wrappers broadcast to every thread; this program does not use
 * them).  The main thread stays root with every capability; thread 1 keeps
 * capabilities over a uid change (keep-caps), thread 2 drops everything and
 * has supplementary groups and securebits of its own.
 *
 * Every thread prints "before tN KEY=VALUE" lines (Uid, Gid, Groups, CapInh,
 * CapPrm, CapEff, CapAmb of /proc/thread-self/status, and securebits); main
 * prints "ready" and waits for DIR/go; then every thread checks its own
 * credentials against what it saw before, prints "after tN ..." lines and
 * "tN same" or "tN changed KEY", and main exits with the number of threads
 * whose credentials changed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/capability.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NKEYS 8
static const char *keys[NKEYS] = {"Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:",
				  "CapEff:", "CapAmb:", "securebits"};
static char seen[3][NKEYS][256];
static int go_pipe[2];
static volatile int ready;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static void die(const char *what)
{
	fprintf(stderr, "error %s: %s\n", what, strerror(errno));
	exit(100);
}

static void read_creds(char vals[NKEYS][256])
{
	char buf[8192];
	FILE *f = fopen("/proc/thread-self/status", "r");

	if (!f)
		die("status");
	for (int k = 0; k < NKEYS; k++)
		vals[k][0] = 0;
	while (fgets(buf, sizeof(buf), f)) {
		for (int k = 0; k < NKEYS - 1; k++) {
			size_t n = strlen(keys[k]);
			if (!strncmp(buf, keys[k], n)) {
				char *v = buf + n;
				v += strspn(v, " \t");
				v[strcspn(v, "\n")] = 0;
				snprintf(vals[k], 256, "%s", v);
			}
		}
	}
	fclose(f);
	snprintf(vals[NKEYS - 1], 256, "%#lx", (long)syscall(SYS_prctl, PR_GET_SECUREBITS, 0, 0, 0, 0));
}

static void report(int t, const char *phase, char vals[NKEYS][256])
{
	pthread_mutex_lock(&out_lock);
	for (int k = 0; k < NKEYS; k++)
		printf("%s t%d %s=%s\n", phase, t, keys[k], vals[k]);
	fflush(stdout);
	pthread_mutex_unlock(&out_lock);
}

/* check after the restart, from inside the thread itself */
static int check(int t)
{
	char now[NKEYS][256];
	int changed = 0;

	read_creds(now);
	report(t, "after", now);
	pthread_mutex_lock(&out_lock);
	for (int k = 0; k < NKEYS; k++)
		if (strcmp(now[k], seen[t][k])) {
			printf("t%d changed %s\n", t, keys[k]);
			changed = 1;
		}
	if (!changed)
		printf("t%d same\n", t);
	fflush(stdout);
	pthread_mutex_unlock(&out_lock);
	return changed;
}

static void capset_raw(unsigned eff, unsigned prm, unsigned inh)
{
	struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct d[2] = {{eff, prm, inh}, {0, 0, 0}};

	if (syscall(SYS_capset, &h, d))
		die("capset");
}

static void *thread_main(void *arg)
{
	int t = (int)(long)arg;
	char c;

	if (t == 1) {
		/* keep-caps: the permitted set survives the uid change */
		if (syscall(SYS_prctl, PR_SET_KEEPCAPS, 1, 0, 0, 0))
			die("keepcaps");
		if (syscall(SYS_setresgid, 5, 6, 7) || syscall(SYS_setresuid, 1, 2, 3))
			die("ids t1");
		unsigned keep = 1u << CAP_SETUID | 1u << CAP_SETGID | 1u << CAP_KILL;
		capset_raw(1u << CAP_KILL, keep, 1u << CAP_SETGID);
	} else {
		/* securebits (noroot, locked) and groups of its own, no capabilities */
		if (syscall(SYS_prctl, PR_SET_SECUREBITS, 0x3, 0, 0, 0))
			die("securebits");
		gid_t groups[2] = {44, 55};
		if (syscall(SYS_setgroups, 2, groups))
			die("setgroups");
		if (syscall(SYS_setresgid, 20, 21, 22) || syscall(SYS_setresuid, 30, 31, 32))
			die("ids t2");
	}
	read_creds(seen[t]);
	report(t, "before", seen[t]);
	__atomic_add_fetch(&ready, 1, __ATOMIC_SEQ_CST);
	/* a pipe, not DIR/go: these threads may not search the test's directory */
	if (read(go_pipe[0], &c, 1) != 1)
		die("go");
	return (void *)(long)check(t);
}

int main(int argc, char **argv)
{
	pthread_t th[3];
	char path[4096];
	int changed;

	setvbuf(stdout, NULL, _IOFBF, 1 << 16);
	if (argc != 2)
		return 2;
	if (pipe(go_pipe))
		die("pipe");
	for (long t = 1; t <= 2; t++)
		if (pthread_create(&th[t], NULL, thread_main, (void *)t))
			die("pthread_create");
	while (__atomic_load_n(&ready, __ATOMIC_SEQ_CST) < 2)
		usleep(1000);
	read_creds(seen[0]);
	report(0, "before", seen[0]);
	printf("ready\n");
	fflush(stdout);
	snprintf(path, sizeof(path), "%s/go", argv[1]);
	while (access(path, F_OK))
		usleep(10000);
	changed = check(0);
	if (write(go_pipe[1], "gg", 2) != 2)
		die("go");
	for (int t = 1; t <= 2; t++) {
		void *r;
		pthread_join(th[t], &r);
		changed += (int)(long)r;
	}
	printf("done\n");
	return changed;
}
