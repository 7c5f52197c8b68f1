/* Task attributes that must survive a checkpoint and restart
 * (tests/test_task_attrs.py).  Run as root: taskattrs DIR
 *
 * The main process sets: scheduling per thread (SCHED_RR|SCHED_RESET_ON_FORK
 * prio 3, nice 7, SCHED_IDLE), oom_score_adj 321, login uid 1234,
 * PR_SET_THP_DISABLE, two membarrier registrations, an mlock()ed mapping.
 * Its children: "creds" (gids 5 6 7, fsgid 8, uids 1 2 3, fsuid 9, kept
 * permitted capabilities, ambient ones, securebits noroot and keep-caps),
 * "stopped" (stopped by SIGTSTP in its own process group, in read() on a
 * pipe that got a byte while it was stopped: after SIGCONT it exits 7),
 * zombies (exit 3, SIGKILL, SIGSEGV) and a zombie whose process group's
 * leader was reaped.
 *
 * Every process prints "before KEY=VALUE" lines, main prints "ready" and
 * waits for DIR/go; then every process prints the same lines as "after
 * KEY=VALUE", main reaps the children ("reaped ...") and prints "done".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/securebits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define LOCKED_SIZE (17 * 4096)

static char line[4096];
static size_t used;
static void put(const char *phase, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void put(const char *phase, const char *key, const char *fmt, ...)
{
	va_list ap;
	used += snprintf(line + used, sizeof(line) - used, "%s %d:%s=", phase, (int)getpid(), key);
	va_start(ap, fmt);
	used += vsnprintf(line + used, sizeof(line) - used, fmt, ap);
	va_end(ap);
	used += snprintf(line + used, sizeof(line) - used, "\n");
}
static void flush(void)
{
	if (write(1, line, used) != (ssize_t)used)
		_exit(90);
	used = 0;
}
static void die(const char *what)
{
	printf("error %s: %s\n", what, strerror(errno));
	fflush(stdout);
	_exit(99);
}

static int read_int(const char *path)
{
	char buf[64] = "";
	int fd = open(path, O_RDONLY);
	if (fd < 0 || read(fd, buf, sizeof(buf) - 1) < 0)
		die(path);
	close(fd);
	return (int)strtoll(buf, NULL, 10);
}
static void write_str(const char *path, const char *val)
{
	int fd = open(path, O_WRONLY);
	if (fd < 0 || write(fd, val, strlen(val)) != (ssize_t)strlen(val))
		die(path);
	close(fd);
}
static void status_line(const char *phase, const char *key)
{
	char buf[8192], *p;
	int fd = open("/proc/self/status", O_RDONLY);
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	buf[n > 0 ? n : 0] = 0;
	p = strstr(buf, key);
	if (!p)
		die(key);
	p += strlen(key) + 1;
	while (*p == '\t' || *p == ' ')
		p++;
	*strchrnul(p, '\n') = 0;
	put(phase, key, "%s", p);
}

/* ---------------------------------------------------------------- threads */
static pid_t tids[3];
static volatile int threads_ready;
static void *thread_main(void *arg)
{
	long i = (long)arg;
	struct sched_param sp = { .sched_priority = 3 };
	tids[i] = gettid();
	if (i == 0 && sched_setscheduler(0, SCHED_RR | SCHED_RESET_ON_FORK, &sp))
		die("sched_setscheduler RR");
	if (i == 1 && setpriority(PRIO_PROCESS, 0, 7))
		die("setpriority");
	sp.sched_priority = 0;
	if (i == 2 && sched_setscheduler(0, SCHED_IDLE, &sp))
		die("sched_setscheduler IDLE");
	__atomic_add_fetch(&threads_ready, 1, __ATOMIC_SEQ_CST);
	for (;;)
		pause();
	return NULL;
}

static char *locked;
static void report_main(const char *ph)
{
	char key[32], buf[256], *p;
	struct sched_param sp;
	FILE *f;
	for (int i = 0; i < 3; i++) {
		snprintf(key, sizeof(key), "thread%d", i);
		errno = 0;
		int nice = getpriority(PRIO_PROCESS, tids[i]);
		if (sched_getparam(tids[i], &sp))
			die("sched_getparam");
		put(ph, key, "policy %d prio %d nice %d", sched_getscheduler(tids[i]),
		    sp.sched_priority, nice);
	}
	put(ph, "oom_score_adj", "%d", read_int("/proc/self/oom_score_adj"));
	put(ph, "loginuid", "%u", (unsigned)read_int("/proc/self/loginuid"));
	put(ph, "thp_disable", "%d", prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0));
	put(ph, "membarrier", "%#lx", syscall(__NR_membarrier, 1 << 9, 0, 0));
	/* the smaps VmFlags of the locked mapping */
	f = fopen("/proc/self/smaps", "r");
	int in = 0;
	while (f && fgets(buf, sizeof(buf), f)) {
		unsigned long a, b;
		char perms[8];
		if (sscanf(buf, "%lx-%lx %4s", &a, &b, perms) == 3)
			in = a == (unsigned long)locked;
		else if (in && !strncmp(buf, "VmFlags:", 8)) {
			p = buf + 8;
			*strchrnul(p, '\n') = 0;
			put(ph, "locked_vmflags", "%s", strstr(p, " lo ") ? "lo" : p);
			in = 0;
		}
	}
	if (f)
		fclose(f);
	put(ph, "locked_data", "%d", locked[4096 * 5]);
}

/* --------------------------------------------------------------- children */
static void wait_go(int fd)
{
	char c;
	while (read(fd, &c, 1) < 0 && errno == EINTR)
		;
}

static void report_creds(const char *ph)
{
	status_line(ph, "Uid:");
	status_line(ph, "Gid:");
	status_line(ph, "CapInh:");
	status_line(ph, "CapPrm:");
	status_line(ph, "CapEff:");
	status_line(ph, "CapAmb:");
	status_line(ph, "CapBnd:");
	put(ph, "securebits", "%#x", prctl(PR_GET_SECUREBITS, 0, 0, 0, 0));
}

static void capset_(uint64_t eff, uint64_t prm, uint64_t inh)
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2] = {
		{ (uint32_t)eff, (uint32_t)prm, (uint32_t)inh },
		{ (uint32_t)(eff >> 32), (uint32_t)(prm >> 32), (uint32_t)(inh >> 32) },
	};
	if (syscall(__NR_capset, &h, d))
		die("capset");
}

static void creds_child(int go, int ready)
{
	uint64_t keep = (1ULL << CAP_NET_BIND_SERVICE) | (1ULL << CAP_SETUID) |
			(1ULL << CAP_NET_RAW) | (1ULL << CAP_KILL);
	if (prctl(PR_CAPBSET_DROP, CAP_SYS_MODULE, 0, 0, 0))
		die("PR_CAPBSET_DROP");
	if (prctl(PR_SET_SECUREBITS, SECBIT_NOROOT, 0, 0, 0))
		die("PR_SET_SECUREBITS");
	if (setresgid(5, 6, 7))
		die("setresgid");
	setfsgid(8);
	capset_(keep, keep, keep & ~(1ULL << CAP_KILL));
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0) ||
	    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_RAW, 0, 0))
		die("ambient raise");
	if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) || setresuid(1, 2, 3))
		die("setresuid");
	/* effective CAP_SETUID again, for setfsuid; then only CAP_NET_RAW */
	capset_(1ULL << CAP_SETUID, keep, keep & ~(1ULL << CAP_KILL));
	setfsuid(9);
	capset_(1ULL << CAP_NET_RAW, keep, keep & ~(1ULL << CAP_KILL));
	/* setresuid dropped the ambient set: raise one again */
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_RAW, 0, 0))
		die("ambient raise 2");
	report_creds("before");
	flush();
	if (write(ready, "c", 1) != 1)
		_exit(91);
	wait_go(go);
	report_creds("after");
	flush();
	_exit(0);
}

static const char *pgid_of(pid_t pid, pid_t leader)
{
	pid_t g = getpgid(pid);
	return g == leader ? "leader" : g == getpgid(0) ? "own" : "other";
}

int main(int argc, char **argv)
{
	int go[2], ready[2], member[2], sp[2];
	pid_t creds, stopped, z_exit, z_kill, z_segv, z_leader, z_member = 0;
	pthread_t th[3];
	char path[4096], c;
	siginfo_t si;

	if (argc != 2)
		return 2;
	setvbuf(stdout, NULL, _IONBF, 0);
	if (pipe(go) || pipe(ready) || pipe(member) || pipe(sp))
		die("pipe");

	creds = fork();
	if (creds == 0) {
		close(go[1]);
		creds_child(go[0], ready[1]);
	}
	stopped = fork();
	if (stopped == 0) {
		char b = 0;
		setpgid(0, 0);   /* not an orphaned process group: SIGTSTP stops it */
		close(sp[1]);
		/* the byte is written while it is stopped: a restored copy that
		 * ran before it stopped again would read it and exit */
		while (read(sp[0], &b, 1) < 0 && errno == EINTR)
			;
		_exit(b == 'x' ? 7 : 8);
	}
	setpgid(stopped, stopped);
	if ((z_exit = fork()) == 0)
		_exit(3);
	if ((z_kill = fork()) == 0) {
		kill(getpid(), SIGKILL);
		_exit(13);
	}
	if ((z_segv = fork()) == 0) {
		struct rlimit r = { 0, 0 };
		setrlimit(RLIMIT_CORE, &r);
		*(volatile int *)NULL = 0;
		_exit(13);
	}
	if ((z_leader = fork()) == 0) {
		setpgid(0, 0);
		pid_t m = syscall(__NR_clone, CLONE_PARENT | SIGCHLD, 0, 0, 0, 0);
		if (m == 0)
			_exit(0);
		if (write(member[1], &m, sizeof(m)) != sizeof(m))
			_exit(91);
		_exit(0);
	}
	if (read(member[0], &z_member, sizeof(z_member)) != sizeof(z_member))
		die("read member");
	if (waitpid(z_leader, NULL, 0) != z_leader)
		die("waitpid leader");
	if (kill(stopped, SIGTSTP))
		die("SIGTSTP");
	if (waitid(P_PID, stopped, &si, WSTOPPED | WNOWAIT))
		die("waitid stopped");
	if (write(sp[1], "x", 1) != 1)
		die("write sp");
	close(sp[0]);
	pid_t zombies[] = { z_exit, z_kill, z_segv, z_member };
	for (int i = 0; i < 4; i++)
		if (waitid(P_PID, zombies[i], &si, WEXITED | WNOWAIT))
			die("waitid zombie");
	if (read(ready[0], &c, 1) != 1)
		die("creds child");

	/* the main process's own attributes */
	for (long i = 0; i < 3; i++)
		pthread_create(&th[i], NULL, thread_main, (void *)i);
	while (__atomic_load_n(&threads_ready, __ATOMIC_SEQ_CST) < 3)
		usleep(1000);
	write_str("/proc/self/oom_score_adj", "321");
	write_str("/proc/self/loginuid", "4294967295");
	write_str("/proc/self/loginuid", "1234");
	if (prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0))
		die("PR_SET_THP_DISABLE");
	if (syscall(__NR_membarrier, 1 << 4, 0, 0) || syscall(__NR_membarrier, 1 << 2, 0, 0))
		die("membarrier");
	locked = mmap(NULL, LOCKED_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (locked == MAP_FAILED)
		die("mmap");
	locked[4096 * 5] = 42;
	if (mlock(locked, LOCKED_SIZE))
		die("mlock");

	report_main("before");
	put("before", "stopped", "pgid %d", getpgid(stopped) == stopped);
	si.si_pid = 0;
	if (waitid(P_PID, stopped, &si, WSTOPPED | WNOWAIT | WNOHANG))
		die("waitid stopped");
	put("before", "stopped", "pid %d code %d status %d", si.si_pid == stopped, si.si_code,
	    si.si_status);
	for (int i = 0; i < 4; i++) {
		if (waitid(P_PID, zombies[i], &si, WEXITED | WNOWAIT))
			die("waitid zombie");
		put("before", "zombie", "%d code %d status %d pgid %s", i, si.si_code,
		    si.si_status, pgid_of(zombies[i], z_leader));
	}
	flush();
	printf("ready\n");

	snprintf(path, sizeof(path), "%s/go", argv[1]);
	for (struct stat st; stat(path, &st);)
		usleep(10000);

	report_main("after");
	put("after", "stopped", "pgid %d", getpgid(stopped) == stopped);
	si.si_pid = 0;
	if (waitid(P_PID, stopped, &si, WSTOPPED | WNOWAIT | WNOHANG))
		die("waitid stopped");
	put("after", "stopped", "pid %d code %d status %d", si.si_pid == stopped, si.si_code,
	    si.si_status);
	for (int i = 0; i < 4; i++) {
		if (waitid(P_PID, zombies[i], &si, WEXITED | WNOWAIT))
			die("waitid zombie");
		put("after", "zombie", "%d code %d status %d pgid %s", i, si.si_code,
		    si.si_status, pgid_of(zombies[i], z_leader));
	}
	flush();
	if (write(go[1], "g", 1) != 1)
		die("go");
	int status;
	if (waitpid(creds, &status, 0) != creds || status)
		printf("creds child status %#x\n", status);
	for (int i = 0; i < 4; i++) {
		if (waitpid(zombies[i], &status, 0) != zombies[i])
			die("waitpid zombie");
		printf("reaped %d %s %d\n", i, WIFEXITED(status) ? "exited" : WIFSIGNALED(status) ?
		       "signaled" : "other", WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
	}
	kill(stopped, SIGCONT);
	if (waitpid(stopped, &status, 0) != stopped)
		die("waitpid stopped");
	printf("reaped stopped %s %d\n", WIFEXITED(status) ? "exited" : "other",
	       WIFEXITED(status) ? WEXITSTATUS(status) : status);
	printf("done\n");
	return 0;
}
