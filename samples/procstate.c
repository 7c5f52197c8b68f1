/*
 * procstate: per-process and per-thread state that must survive a restart.
 *
 *   procstate DIR      DIR: an empty directory (it becomes the cwd)
 *
 * Sets up, then prints "before ..." lines and "ready", then polls (raw
 * syscalls, no signals) until DIR/go exists, then prints "after ..." lines
 * for the same state, exercises it (reads, writes, unblocks the pending
 * signals, forks once) and prints what happened, then "done" (exit 0).
 * Nothing printed depends on DIR, pids or addresses, so a run checkpointed
 * while it waits and restarted prints the same as an uninterrupted run, and
 * every "after STATE" line equals its "before STATE" line.
 *
 * State: umask 027; cwd DIR; RLIMIT_NOFILE soft 123; an ITIMER_REAL (900 s,
 * interval 1000 s); a sigaltstack per thread and SA_ONSTACK handlers; main
 * blocks USR1 WINCH RTMIN+3, thread t2 blocks USR1 USR2 CHLD RTMIN+2 RTMIN+3;
 * pending: USR1 (kill) and RTMIN+3 (sigqueue 777) process-wide, USR2
 * (pthread_kill) and RTMIN+2 (pthread_sigqueue 4242) for t2; fds 3 DIR/sub
 * (O_DIRECTORY), 4 /dev/zero, 5 /dev/urandom, 6 /dev/random, 7 DIR/app.log
 * (O_APPEND, at offset 6 while the file has 11 bytes), 8 DIR/app.log (plain),
 * 9 DIR/ce.txt (O_CLOEXEC, offset 3); anonymous mappings marked
 * MADV_DONTFORK, MADV_DONTDUMP and MADV_WIPEONFORK with known content;
 * values in ymm14 and xmm15 held across the wait (when the CPU has AVX).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096
#define MAP_PAGES 4
#define NOFILE_SOFT 123

static char alt_main[65536] __attribute__((aligned(16)));
static char alt_t2[32768] __attribute__((aligned(16)));
static pid_t main_tid, t2_tid;
static char *m_dc, *m_dd, *m_wf;
static char dir[PATH_MAX];
static rlim_t nofile_hard;

/* ---------------------------------------------------------------- handlers */
struct logent { int sig, in_main, code, value, from_self, onstack, in_alt; };
static struct logent sig_log[16];
static volatile int nlog;

static void handler(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    volatile char here = 0;
    stack_t cur;
    struct logent e = { sig, (pid_t)syscall(SYS_gettid) == main_tid, si->si_code,
                        si->si_code == SI_QUEUE ? si->si_value.sival_int : 0,
                        si->si_pid == getpid(), 0, 0 };
    if (sigaltstack(NULL, &cur) == 0) {
        e.onstack = (cur.ss_flags & SS_ONSTACK) != 0;
        e.in_alt = (char *)&here >= (char *)cur.ss_sp &&
                   (char *)&here < (char *)cur.ss_sp + cur.ss_size;
    }
    if (nlog < 16)
        sig_log[nlog++] = e;
}

static void alarm_handler(int sig) { (void)sig; write(2, "SIGALRM?\n", 9); }

static void print_log(void)
{
    for (int i = 0; i < nlog; i++)
        printf("signal %d thread=%s code=%d value=%d from_self=%d onstack=%d in_altstack=%d\n",
               sig_log[i].sig, sig_log[i].in_main ? "main" : "t2", sig_log[i].code,
               sig_log[i].value, sig_log[i].from_self, sig_log[i].onstack, sig_log[i].in_alt);
    nlog = 0;
}

/* ------------------------------------------------------------- formatting */
static void sigset_str(const sigset_t *s, char *buf, size_t n)
{
    size_t o = 0;
    buf[0] = 0;
    for (int sig = 1; sig < 65 && o + 8 < n; sig++)
        if (sigismember(s, sig) == 1)
            o += snprintf(buf + o, n - o, "%s%d", o ? "," : "", sig);
    if (!o)
        snprintf(buf, n, "-");
}

static void thread_str(const char *who, const char *altbuf, size_t altsize, char *out, size_t n)
{
    sigset_t mask, pend;
    char m[256], p[256];
    stack_t ss;
    pthread_sigmask(SIG_SETMASK, NULL, &mask);
    sigpending(&pend);
    sigset_str(&mask, m, sizeof m);
    sigset_str(&pend, p, sizeof p);
    sigaltstack(NULL, &ss);
    snprintf(out, n, "%s tid_same=%d blocked=%s pending=%s altstack_sp_ok=%d size=%zu "
             "flags=%d\n", who,
             (pid_t)syscall(SYS_gettid) == (altbuf == alt_main ? main_tid : t2_tid), m, p,
             ss.ss_sp == altbuf, ss.ss_size, ss.ss_flags);
    (void)altsize;
}

/* ---------------------------------------------------------------- thread t2 */
enum { CMD_REPORT = 1, CMD_UNBLOCK, CMD_EXIT };
static pthread_mutex_t cmd_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cmd_cv = PTHREAD_COND_INITIALIZER;
static int cmd, cmd_seq, cmd_done;
static char t2_report[512];

static void *t2_main(void *arg)
{
    (void)arg;
    stack_t ss = { .ss_sp = alt_t2, .ss_size = sizeof alt_t2, .ss_flags = 0 };
    sigset_t set;
    t2_tid = (pid_t)syscall(SYS_gettid);
    sigaltstack(&ss, NULL);
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGUSR2);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGRTMIN + 2);
    sigaddset(&set, SIGRTMIN + 3);
    pthread_sigmask(SIG_SETMASK, &set, NULL);
    pthread_mutex_lock(&cmd_lock);
    for (;;) {
        cmd_done = cmd_seq;
        pthread_cond_broadcast(&cmd_cv);
        while (cmd_seq == cmd_done)
            pthread_cond_wait(&cmd_cv, &cmd_lock);
        if (cmd == CMD_EXIT)
            break;
        if (cmd == CMD_UNBLOCK) {
            int sigs[2] = { SIGUSR2, SIGRTMIN + 2 };
            for (int i = 0; i < 2; i++) {
                sigemptyset(&set);
                sigaddset(&set, sigs[i]);
                pthread_sigmask(SIG_UNBLOCK, &set, NULL);
            }
        }
        thread_str("t2", alt_t2, sizeof alt_t2, t2_report, sizeof t2_report);
    }
    cmd_done = cmd_seq;
    pthread_cond_broadcast(&cmd_cv);
    pthread_mutex_unlock(&cmd_lock);
    return NULL;
}

static void t2_do(int c)
{
    pthread_mutex_lock(&cmd_lock);
    while (cmd_done != cmd_seq)
        pthread_cond_wait(&cmd_cv, &cmd_lock);
    cmd = c;
    cmd_seq++;
    pthread_cond_broadcast(&cmd_cv);
    while (cmd_done != cmd_seq)
        pthread_cond_wait(&cmd_cv, &cmd_lock);
    pthread_mutex_unlock(&cmd_lock);
}

/* ----------------------------------------------------------------- helpers */
static unsigned long sum_map(const char *m)
{
    unsigned long s = 0;
    for (size_t i = 0; i < MAP_PAGES * PAGE; i++)
        s = s * 31 + (unsigned char)m[i];
    return s;
}

static char *make_map(int advice, int seed)
{
    char *m = mmap(NULL, MAP_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (m == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    for (size_t i = 0; i < MAP_PAGES * PAGE; i++)
        m[i] = (char)(i * seed + seed);
    if (madvise(m, MAP_PAGES * PAGE, advice) != 0) {
        perror("madvise");
        exit(1);
    }
    return m;
}

/* "dc dd wf" flags of the VMA holding addr, from /proc/self/smaps */
static void vmflags(const char *addr, char *out, size_t n)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[512];
    int inside = 0;
    snprintf(out, n, "?");
    while (f && fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            inside = (unsigned long)addr >= lo && (unsigned long)addr < hi;
        } else if (inside && strncmp(line, "VmFlags:", 8) == 0) {
            size_t o = 0;
            const char *want[] = { "dc", "dd", "wf" };
            out[0] = 0;
            for (int i = 0; i < 3; i++) {
                char pat[5];
                snprintf(pat, sizeof pat, " %s", want[i]);
                char *hit = strstr(line + 8, pat);
                if (hit && (hit[3] == ' ' || hit[3] == '\n'))
                    o += snprintf(out + o, n - o, "%s%s", o ? "," : "", want[i]);
            }
            if (!o)
                snprintf(out, n, "-");
            break;
        }
    }
    if (f)
        fclose(f);
}

static void fd_line(const char *tag, int fd)
{
    struct stat st;
    int fdfl = fcntl(fd, F_GETFD), fl = fcntl(fd, F_GETFL);
    if (fstat(fd, &st) != 0 || fdfl < 0 || fl < 0) {
        printf("%s fd %d: %s\n", tag, fd, strerror(errno));
        return;
    }
    printf("%s fd %d cloexec=%d acc=%d append=%d directory=%d", tag, fd, !!(fdfl & FD_CLOEXEC),
           fl & O_ACCMODE, !!(fl & O_APPEND), !!(fl & O_DIRECTORY));
    if (S_ISCHR(st.st_mode))
        printf(" chr=%u:%u", major(st.st_rdev), minor(st.st_rdev));
    else if (S_ISDIR(st.st_mode))
        printf(" dir");
    else if (S_ISREG(st.st_mode))
        printf(" reg size=%lld pos=%lld", (long long)st.st_size,
               (long long)lseek(fd, 0, SEEK_CUR));
    printf("\n");
}

static void print_state(const char *tag)
{
    char buf[512];
    struct itimerval it;
    struct rlimit rl;
    char cwd[PATH_MAX];
    mode_t m = umask(0);
    umask(m);
    printf("%s umask=%03o\n", tag, (unsigned)m);
    printf("%s cwd_is_dir=%d\n", tag, getcwd(cwd, sizeof cwd) && strcmp(cwd, dir) == 0);
    getrlimit(RLIMIT_NOFILE, &rl);
    printf("%s nofile soft=%lu hard_same=%d\n", tag, (unsigned long)rl.rlim_cur,
           rl.rlim_max == nofile_hard);
    getitimer(ITIMER_REAL, &it);
    long long left = it.it_value.tv_sec * 1000000LL + it.it_value.tv_usec;
    printf("%s itimer interval=%ld.%06ld left_ok=%d\n", tag, (long)it.it_interval.tv_sec,
           (long)it.it_interval.tv_usec, left > 0 && left <= 900000000LL);
    for (int sig = 1; sig < 65; sig++) {
        struct sigaction sa;
        if (sig == SIGKILL || sig == SIGSTOP || sigaction(sig, NULL, &sa) != 0)
            continue;
        if (sa.sa_handler != SIG_DFL)
            printf("%s sigaction %d %s flags_onstack=%d siginfo=%d\n", tag, sig,
                   sa.sa_handler == SIG_IGN ? "ignored" : "handler",
                   !!(sa.sa_flags & SA_ONSTACK), !!(sa.sa_flags & SA_SIGINFO));
    }
    thread_str("main", alt_main, sizeof alt_main, buf, sizeof buf);
    printf("%s %s", tag, buf);
    t2_do(CMD_REPORT);
    printf("%s %s", tag, t2_report);
    for (int fd = 3; fd <= 9; fd++)
        fd_line(tag, fd);
    const char *names[3] = { "dontfork", "dontdump", "wipeonfork" };
    char *maps[3] = { m_dc, m_dd, m_wf };
    for (int i = 0; i < 3; i++) {
        vmflags(maps[i], buf, sizeof buf);
        printf("%s map %s vmflags=%s sum=%lx\n", tag, names[i], buf, sum_map(maps[i]));
    }
}

/* Wait for DIR/go with raw syscalls only (access, nanosleep), holding known
 * values in ymm14 and xmm15 the whole time: no libc call can clobber them. */
static int wait_go(const char *path, unsigned char out[48])
{
    static const unsigned char in[48] = "ymm14-holds-32-bytes-of-data!!!xmm15:16 bytes.";
    struct timespec ts = { 0, 20 * 1000000L };
    int avx = __builtin_cpu_supports("avx");
    if (avx) {
        __asm__ volatile(
            "vmovdqu (%[in]), %%ymm14\n\t"
            "vmovdqu 32(%[in]), %%xmm15\n\t"
            "1:\n\t"
            "mov $21, %%eax\n\t"          /* access(path, F_OK) */
            "mov %[path], %%rdi\n\t"
            "xor %%esi, %%esi\n\t"
            "syscall\n\t"
            "test %%rax, %%rax\n\t"
            "jz 2f\n\t"
            "mov $35, %%eax\n\t"          /* nanosleep(&ts, NULL) */
            "lea %[ts], %%rdi\n\t"
            "xor %%esi, %%esi\n\t"
            "syscall\n\t"
            "jmp 1b\n\t"
            "2:\n\t"
            "vmovdqu %%ymm14, (%[out])\n\t"
            "vmovdqu %%xmm15, 32(%[out])\n\t"
            "vzeroupper\n\t"
            : : [in] "r"(in), [out] "r"(out), [path] "r"(path), [ts] "m"(ts)
            : "rax", "rcx", "r11", "rdi", "rsi", "memory", "cc", "xmm14", "xmm15");
        return memcmp(in, out, 48) == 0;
    }
    while (access(path, F_OK) != 0)
        nanosleep(&ts, NULL);
    return -1;
}

static void check_restored(void)
{
    char buf[256];
    /* the directory fd: fchdir + getdents */
    if (fchdir(3) == 0 && getcwd(buf, sizeof buf)) {
        size_t l = strlen(buf);
        printf("dirfd fchdir_ok=%d", l >= 4 && strcmp(buf + l - 4, "/sub") == 0);
    } else {
        printf("dirfd fchdir: %s", strerror(errno));
    }
    char names[4][64];
    int nn = 0;
    long n = syscall(SYS_getdents64, 3, buf, sizeof buf);
    for (long o = 0; o < n;) {
        struct dirent64 *d = (struct dirent64 *)(buf + o);
        if (strcmp(d->d_name, ".") && strcmp(d->d_name, "..") && nn < 4)
            snprintf(names[nn++], 64, "%.63s", d->d_name);
        o += d->d_reclen;
    }
    if (nn == 2 && strcmp(names[0], names[1]) > 0) {
        char t[64];
        memcpy(t, names[0], 64); memcpy(names[0], names[1], 64); memcpy(names[1], t, 64);
    }
    printf(" entries=%d", nn);
    for (int i = 0; i < nn; i++)
        printf(" %s", names[i]);
    int a = openat(3, "a", O_RDONLY);
    ssize_t r = a >= 0 ? read(a, buf, 16) : -1;
    printf(" a=%.*s\n", r > 0 ? (int)r - 1 : 0, buf);
    if (a >= 0)
        close(a);
    if (chdir(dir) != 0)
        perror("chdir");

    /* devices */
    memset(buf, 0xff, 64);
    r = read(4, buf, 64);
    int zeros = r == 64;
    for (int i = 0; i < 64; i++)
        zeros &= buf[i] == 0;
    printf("dev zero_read=%d urandom_read=%d random_read=%d\n", zeros,
           read(5, buf, 16) == 16, read(6, buf, 16) == 16);

    /* O_APPEND goes to the end although another fd grew the file */
    r = write(7, "second\n", 7);
    printf("append wrote=%zd pos=%lld", r, (long long)lseek(7, 0, SEEK_CUR));
    int rd = open("app.log", O_RDONLY | O_CLOEXEC);
    r = rd >= 0 ? read(rd, buf, sizeof buf - 1) : -1;
    buf[r > 0 ? r : 0] = 0;
    if (rd >= 0)
        close(rd);
    for (char *p = buf; *p; p++)
        if (*p == '\n')
            *p = '|';
    printf(" content=%s\n", buf);
    r = read(9, buf, sizeof buf - 1);
    buf[r > 0 ? r - 1 : 0] = 0;
    printf("cloexec file rest=%s\n", buf);

    /* the lowered RLIMIT_NOFILE is enforced */
    errno = 0;
    int d = dup2(0, NOFILE_SOFT + 10);
    printf("nofile dup2_above_limit=%d errno=%s\n", d, strerror(errno));

    /* MADV_DONTFORK / MADV_WIPEONFORK as a child sees them */
    pid_t c = fork();
    if (c == 0) {
        int code = 0;
        if (msync(m_dc, PAGE, MS_ASYNC) != 0 && errno == ENOMEM)
            code |= 1;                  /* not mapped in the child */
        if (m_wf[100] == 0 && m_wf[PAGE * 2 + 5] == 0)
            code |= 2;                  /* wiped in the child */
        if (m_dd[100] == (char)(100 * 5 + 5))
            code |= 4;                  /* copied as usual */
        _exit(code);
    }
    int st = 0;
    waitpid(c, &st, 0);
    printf("fork child dontfork_absent=%d wipeonfork_zero=%d dontdump_copied=%d\n",
           WEXITSTATUS(st) & 1, !!(WEXITSTATUS(st) & 2), !!(WEXITSTATUS(st) & 4));

    /* the pending signals: process-wide ones go to main (t2 blocks them) */
    int sigs[2] = { SIGUSR1, SIGRTMIN + 3 };
    for (int i = 0; i < 2; i++) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, sigs[i]);
        pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    }
    print_log();
    t2_do(CMD_UNBLOCK);
    print_log();
    printf("t2 after unblock: %s", t2_report + 3);
}

int main(int argc, char **argv)
{
    if (argc != 2 || !realpath(argv[1], dir) || chdir(dir) != 0) {
        fprintf(stderr, "usage: procstate EMPTY-DIR\n");
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    main_tid = (pid_t)syscall(SYS_gettid);
    umask(027);

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    nofile_hard = rl.rlim_max;
    rl.rlim_cur = NOFILE_SOFT;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
        perror("setrlimit");
        return 1;
    }

    stack_t ss = { .ss_sp = alt_main, .ss_size = sizeof alt_main, .ss_flags = 0 };
    if (sigaltstack(&ss, NULL) != 0) {
        perror("sigaltstack");
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigfillset(&sa.sa_mask);
    int hsigs[4] = { SIGUSR1, SIGUSR2, SIGRTMIN + 2, SIGRTMIN + 3 };
    for (int i = 0; i < 4; i++)
        sigaction(hsigs[i], &sa, NULL);
    signal(SIGALRM, alarm_handler);
    signal(SIGPIPE, SIG_IGN);
    struct itimerval it = { { 1000, 0 }, { 900, 0 } };
    setitimer(ITIMER_REAL, &it, NULL);

    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGRTMIN + 3);
    pthread_sigmask(SIG_SETMASK, &set, NULL);
    pthread_t t2;
    if (pthread_create(&t2, NULL, t2_main, NULL) != 0) {
        perror("pthread_create");
        return 1;
    }
    sigaddset(&set, SIGWINCH);
    pthread_sigmask(SIG_SETMASK, &set, NULL);
    t2_do(CMD_REPORT);                  /* t2 has set its mask */

    union sigval v;
    kill(getpid(), SIGUSR1);
    v.sival_int = 777;
    sigqueue(getpid(), SIGRTMIN + 3, v);
    pthread_kill(t2, SIGUSR2);
    v.sival_int = 4242;
    pthread_sigqueue(t2, SIGRTMIN + 2, v);

    /* files: fds 3..9 in this order */
    if (mkdir("sub", 0755) != 0) {
        perror("mkdir sub");
        return 1;
    }
    int fd = open("sub/a", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, "A\n", 2) != 2)
        return 1;
    close(fd);
    close(open("sub/b", O_WRONLY | O_CREAT | O_TRUNC, 0644));
    fd = open("ce.txt", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, "cloexec\n", 8) != 8)
        return 1;
    close(fd);
    int fds[7] = {
        open("sub", O_RDONLY | O_DIRECTORY),
        open("/dev/zero", O_RDONLY),
        open("/dev/urandom", O_RDONLY),
        open("/dev/random", O_RDONLY),
        open("app.log", O_WRONLY | O_APPEND | O_CREAT | O_TRUNC, 0644),
        open("app.log", O_WRONLY),
        open("ce.txt", O_RDONLY | O_CLOEXEC),
    };
    for (int i = 0; i < 7; i++)
        if (fds[i] != 3 + i) {
            fprintf(stderr, "procstate: fd %d is %d\n", i + 3, fds[i]);
            return 1;
        }
    char tmp[4];
    if (write(7, "first\n", 6) != 6 || lseek(8, 6, SEEK_SET) != 6 || write(8, "more\n", 5) != 5
        || read(9, tmp, 3) != 3)
        return 1;

    m_dc = make_map(MADV_DONTFORK, 3);
    m_dd = make_map(MADV_DONTDUMP, 5);
    m_wf = make_map(MADV_WIPEONFORK, 7);

    print_state("before");
    printf("ready\n");
    fflush(stdout);

    char go[PATH_MAX + 8];
    snprintf(go, sizeof go, "%s/go", dir);
    unsigned char regs[48];
    int regs_ok = wait_go(go, regs);

    print_state("after");
    printf("vector registers kept=%d\n", regs_ok);
    check_restored();
    t2_do(CMD_EXIT);
    pthread_join(t2, NULL);
    printf("done\n");
    return 0;
}
