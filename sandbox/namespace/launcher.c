/*
 * hitz-launch: build one task's sandbox and run the task in it.
 *
 * hitz plans a sandbox in Python (sandbox/namespace/plan.py: a list of small
 * operations) and starts this program once per task with posix_spawn, so the
 * scheduler never forks its own large heap and no interpreter starts per
 * task. This program only applies the plan: one case per operation, one
 * syscall per step (STYLE 7). The guarantees it provides are listed in
 * sandbox/namespace/__init__.py and docs/security-model.md.
 *
 * Built by hitz on first use (sandbox/namespace/build.py), static, from this
 * file and ../landlock.h, the Landlock rules it shares with the docker
 * backend's container init.
 *
 * On entry: fd 0 /dev/null, fd 1 and 2 the task's log files, fd 3 a memfd
 * holding the plan, fd 4 the report pipe, and for a held launch fd 5, the
 * go pipe; argv[1] is hitz's pid.
 *
 * A held launch builds the whole sandbox, then waits for one byte 'G' on
 * fd 5 before it starts the task (end of file: it exits without running
 * it). hitz prepares the next task this way while the running ones finish,
 * so a free slot starts a task at once instead of after the set-up.
 *
 * Processes:
 *
 *   launcher  host pid namespace. Creates the task's pid namespace (and, when
 *     |       hitz is not root, the outer user namespace), writes the task's
 *     |       id maps, forwards SIGTERM, waits.
 *     +- init  pid 1 of the new pid namespace: creates the other namespaces,
 *          |   builds the root, pivots, enters the task's own user
 *          |   namespace, reaps orphans, forwards SIGTERM to every process.
 *          +- task  new session, default signals, fds 0-2 only, exec.
 *
 * When init exits the kernel kills everything left in its pid namespace, so
 * nothing outlives the task. PR_SET_PDEATHSIG chains the tree to hitz.
 *
 * Reports, one line each on fd 4:
 *   E <step> <errno> <op index or -1> <text>   setup or exec failed
 *   X <wait status>                            how the task ended
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/mount.h>
#include <linux/seccomp.h>
#include <linux/securebits.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../landlock.h"

#define PLAN_FD 3
#define REPORT_FD 4
#define GO_FD 5 /* held launches only: one byte 'G' starts the task */
#define FILTER_FD 6 /* with a seccomp profile: a memfd holding its BPF program */
#define SCRATCH "/tmp"

/* The task's own restrictions, applied by the task process itself just
 * before exec, in the order of lock_down(). */
static struct {
    unsigned long long keep_caps; /* capabilities named by the policy (bit n = cap n) */
    int seccomp;                  /* a BPF program waits on FILTER_FD */
    int nlimits;
    struct {
        int resource;
        rlim_t value;
    } limits[16];
} policy;

static struct {
    int mode; /* LL_MODE_OFF, LL_MODE_REQUIRED or LL_MODE_BEST_EFFORT */
    int npaths;
    const char **writable; /* sandbox paths where the task may write */
} landlock;

static int host_root;      /* hitz runs as the host's root */
static long outer_id;      /* the id the task's root maps to, in our user namespace */

static char **plan;        /* the plan's NUL-separated fields */
static size_t plan_len, plan_pos;
static const char *step = "launcher";
static long op_index = -1;
static pid_t child_pid;    /* the launcher's init, or init's task */

/* ---- reporting ------------------------------------------------------- */

static void report(const char *fmt, ...) {
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t ignored = write(REPORT_FD, buf, n);
    (void)ignored;
}

/* Report the failed step with errno and the operation being applied, then
 * exit: hitz restates it in the user's terms (it knows which input op N
 * exposes). */
static void __attribute__((noreturn)) die(const char *what) {
    int err = errno;
    report("E %s %d %ld %s: %s", step, err, op_index, what, strerror(err));
    _exit(125);
}

/* ---- the plan ---------------------------------------------------------- */

static const char *next(void) {
    if (plan_pos >= plan_len) {
        errno = EINVAL;
        die("truncated plan");
    }
    return plan[plan_pos++];
}

static long next_int(void) { return strtol(next(), NULL, 10); }

static void read_plan(void) {
    struct stat st;
    if (fstat(PLAN_FD, &st) < 0) die("fstat plan");
    char *buf = malloc(st.st_size + 1);
    if (!buf) die("malloc");
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t n = pread(PLAN_FD, buf + got, st.st_size - got, got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) die("read plan");
        got += n;
    }
    buf[got] = '\0';
    close(PLAN_FD);
    size_t count = 0;
    for (size_t i = 0; i < got; i++) count += buf[i] == '\0';
    plan = malloc((count + 1) * sizeof *plan);
    if (!plan) die("malloc");
    char *p = buf;
    for (size_t i = 0; i < count; i++) {
        plan[i] = p;
        p += strlen(p) + 1;
    }
    plan_len = count;
    if (plan_len == 0 || strcmp(plan[0], "hitz-launch/1") != 0) {
        errno = EINVAL;
        die("plan version");
    }
    plan_pos = 1;
}

/* ---- user namespaces (see userns.py for the two layers) ----------------- */

static void write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) die(path);
    if (write(fd, text, strlen(text)) < 0) die(path);
    close(fd);
}

static void map_ids(pid_t pid, long outer_uid, long outer_gid) {
    char path[64], text[64];
    snprintf(text, sizeof text, "0 %ld 1", outer_uid);
    snprintf(path, sizeof path, "/proc/%d/uid_map", pid);
    write_file(path, text);
    snprintf(text, sizeof text, "0 %ld 1", outer_gid);
    snprintf(path, sizeof path, "/proc/%d/gid_map", pid);
    write_file(path, text);
}

/* ---- mounts ---------------------------------------------------------------- */

#define NEWROOT "/newroot"
#define OLDROOT "/oldroot"

static char *in(const char *prefix, const char *path) {
    static char bufs[2][8192];
    static int which;
    char *buf = bufs[which ^= 1];
    snprintf(buf, sizeof bufs[0], "%s%s", prefix, strcmp(path, "/") == 0 ? "" : path);
    if (buf[0] == '\0') strcpy(buf, "/");
    return buf;
}

static void make_read_only(const char *path, int recursive) {
    /* mount_setattr (5.12+) flips only the read-only bit, on every submount
     * of a recursive bind; older kernels need a remount restating the flags
     * the mount has, since a user namespace may not clear locked flags
     * (mount_namespaces(7)). */
    struct mount_attr attr = {.attr_set = MOUNT_ATTR_RDONLY};
    if (syscall(SYS_mount_setattr, AT_FDCWD, path, recursive ? AT_RECURSIVE : 0, &attr,
                sizeof attr) == 0)
        return;
    if (errno != ENOSYS) die("mount_setattr");
    struct statvfs sv;
    if (statvfs(path, &sv) < 0) die("statvfs");
    unsigned long keep = 0;
    if (sv.f_flag & ST_NOSUID) keep |= MS_NOSUID;
    if (sv.f_flag & ST_NODEV) keep |= MS_NODEV;
    if (sv.f_flag & ST_NOEXEC) keep |= MS_NOEXEC;
    if (sv.f_flag & ST_NOATIME) keep |= MS_NOATIME;
    if (sv.f_flag & ST_NODIRATIME) keep |= MS_NODIRATIME;
    if (sv.f_flag & ST_RELATIME) keep |= MS_RELATIME;
    if (mount(NULL, path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, NULL) < 0)
        die("remount read-only");
}

static void apply_ops(void) {
    long count = next_int();
    for (op_index = 0; op_index < count; op_index++) {
        const char *kind = next();
        if (strcmp(kind, "Tmpfs") == 0) {
            const char *path = next();
            long size = next_int(), mode = next_int();
            char data[64];
            if (size)
                snprintf(data, sizeof data, "mode=%lo,size=%ld", mode, size);
            else
                snprintf(data, sizeof data, "mode=%lo", mode);
            if (mount("tmpfs", in(NEWROOT, path), "tmpfs", MS_NOSUID | MS_NODEV, data) < 0)
                die("mount tmpfs");
        } else if (strcmp(kind, "MakeDir") == 0) {
            const char *path = in(NEWROOT, next());
            long mode = next_int();
            if (mkdir(path, mode) < 0) {
                if (errno != EEXIST) die("mkdir");
            } else if ((mode & 07000) && chmod(path, mode) < 0) {
                die("chmod"); /* mkdir applies the umask and drops the sticky bit */
            }
        } else if (strcmp(kind, "MakeFile") == 0) {
            int fd = open(in(NEWROOT, next()), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
            if (fd < 0) die("create mount point");
            close(fd);
        } else if (strcmp(kind, "WriteFile") == 0) {
            const char *path = in(NEWROOT, next());
            const char *content = next();
            long mode = next_int();
            int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, mode);
            if (fd < 0 || write(fd, content, strlen(content)) < 0) die("write file");
            close(fd);
        } else if (strcmp(kind, "MakeStagingDir") == 0) {
            /* mkdir -p under the host root, each new folder owned by the
             * task's uid so that it may write its outputs there. */
            char path[8192];
            snprintf(path, sizeof path, "%s", in(OLDROOT, next()));
            for (char *slash = path + strlen(OLDROOT) + 1;; slash++) {
                char c = *slash;
                if (c != '/' && c != '\0') continue;
                *slash = '\0';
                if (mkdir(path, 0755) == 0) {
                    if (host_root && chown(path, outer_id, outer_id) < 0) die("chown staging");
                } else if (errno != EEXIST) {
                    die("mkdir staging");
                }
                *slash = c;
                if (c == '\0') break;
            }
            /* The folder itself even if it was there (the staging folder hitz
             * made, for outputs at the project's top). */
            if (host_root && chown(path, outer_id, outer_id) < 0) die("chown staging");
        } else if (strcmp(kind, "Symlink") == 0) {
            const char *target = next();
            if (symlink(target, in(NEWROOT, next())) < 0) die("symlink");
        } else if (strcmp(kind, "BindReadOnly") == 0) {
            const char *source = in(OLDROOT, next());
            const char *path = in(NEWROOT, next());
            if (mount(source, path, NULL, MS_BIND | MS_REC, NULL) < 0) die("bind");
            make_read_only(path, 1);
        } else if (strcmp(kind, "BindWritable") == 0 || strcmp(kind, "BindDevice") == 0) {
            const char *source = in(OLDROOT, next());
            if (mount(source, in(NEWROOT, next()), NULL, MS_BIND, NULL) < 0) die("bind");
        } else if (strcmp(kind, "MountProc") == 0) {
            if (mount("proc", in(NEWROOT, next()), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      NULL) < 0)
                die("mount proc");
        } else if (strcmp(kind, "ReadOnlySubtree") == 0) {
            const char *path = in(NEWROOT, next());
            if (mount(path, path, NULL, MS_BIND | MS_REC, NULL) < 0) die("bind");
            make_read_only(path, 1);
        } else if (strcmp(kind, "Mask") == 0) {
            const char *path = in(NEWROOT, next());
            struct stat st;
            if (lstat(path, &st) < 0) {
                if (errno != ENOENT) die("stat a path to mask");
            } else if (S_ISDIR(st.st_mode)) {
                if (mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY,
                          "size=0,mode=0555") < 0)
                    die("mask a folder");
            } else if (mount(in(NEWROOT, "/dev/null"), path, NULL, MS_BIND, NULL) < 0) {
                die("mask a file");
            }
        } else if (strcmp(kind, "RemountReadOnly") == 0) {
            make_read_only(in(NEWROOT, next()), 0);
        } else {
            errno = EINVAL;
            die(kind);
        }
    }
    op_index = -1;
}

/* ---- network ------------------------------------------------------------- */

/* A new network namespace's loopback is down: bring it up so a task can talk
 * to itself on 127.0.0.1. Nothing else exists in the namespace. */
static void loopback_up(void) {
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) die("socket");
    struct ifreq req = {0};
    strcpy(req.ifr_name, "lo");
    if (ioctl(sock, SIOCGIFFLAGS, &req) < 0) die("SIOCGIFFLAGS lo");
    req.ifr_flags |= IFF_UP;
    if (ioctl(sock, SIOCSIFFLAGS, &req) < 0) die("SIOCSIFFLAGS lo");
    close(sock);
}

/* ---- init and the task --------------------------------------------------- */

static void forward(int sig) {
    if (child_pid > 0) kill(getpid() == 1 ? -1 : child_pid, sig);
}

static const char *resolve(const char *cmd, char *const env[], char *buf, size_t size) {
    if (strchr(cmd, '/')) return cmd;
    const char *path = "";
    for (char *const *e = env; *e; e++)
        if (strncmp(*e, "PATH=", 5) == 0) path = *e + 5;
    while (1) {
        const char *end = strchrnul(path, ':');
        int len = end - path;
        snprintf(buf, size, "%.*s%s%s", len, len ? path : ".", "/", cmd);
        if (access(buf, X_OK) == 0) {
            struct stat st;
            if (stat(buf, &st) == 0 && S_ISREG(st.st_mode)) return buf;
        }
        if (!*end) break;
        path = end + 1;
    }
    errno = ENOENT;
    return NULL;
}

/* ---- the task's own restrictions ----------------------------------------- */

static void limit_resources(void) {
    step = "rlimits";
    for (int i = 0; i < policy.nlimits; i++) {
        struct rlimit lim = {policy.limits[i].value, policy.limits[i].value};
        if (setrlimit(policy.limits[i].resource, &lim) < 0) die("setrlimit");
    }
}

/* Drop every capability the policy does not name: from the bounding set (so
 * no exec can bring one back), the ambient, inheritable, permitted and
 * effective sets; and lock the securebits so that being uid 0 of the task's
 * user namespace grants nothing at exec (capabilities(7), "securebits").
 * The order matters: the securebits and the bounding set need CAP_SETPCAP,
 * which capset() then removes; a named capability survives exec only as an
 * ambient one, raised last. */
static void drop_capabilities(void) {
    step = "capabilities";
    int last = CAP_LAST_CAP;
    FILE *f = fopen("/proc/sys/kernel/cap_last_cap", "re");
    if (f) {
        if (fscanf(f, "%d", &last) != 1) last = CAP_LAST_CAP;
        fclose(f);
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0) die("clear ambient");
    int bits = SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP |
               SECBIT_NO_SETUID_FIXUP_LOCKED | SECBIT_KEEP_CAPS_LOCKED;
    if (!policy.keep_caps) bits |= SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    if (prctl(PR_SET_SECUREBITS, bits, 0, 0, 0) < 0) die("PR_SET_SECUREBITS");
    for (int cap = 0; cap <= last; cap++) {
        if (!(policy.keep_caps >> cap & 1) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
            die("PR_CAPBSET_DROP");
    }
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2] = {{0}};
    data[0].effective = data[0].permitted = data[0].inheritable = (__u32)policy.keep_caps;
    data[1].effective = data[1].permitted = data[1].inheritable =
        (__u32)(policy.keep_caps >> 32);
    if (syscall(SYS_capset, &header, data) < 0) die("capset");
    for (int cap = 0; cap <= last; cap++) {
        if ((policy.keep_caps >> cap & 1) &&
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) < 0)
            die("raise ambient capability");
    }
}

/* Landlock (the rules: ../landlock.h, shared with the docker backend's
 * init): the mount layout already makes the root read-only and shows only
 * declared inputs; the rules say the same to the LSM, so a kernel bug in
 * the mount code is not enough to write elsewhere. init set no_new_privs,
 * which landlock_restrict_self requires. */
static void restrict_filesystem(void) {
    step = "landlock";
    const char *failed;
    if (landlock_confine(landlock.mode, landlock.npaths, landlock.writable, &failed) < 0)
        die(failed);
}

/* Last step before exec, so the filter never has to allow set-up syscalls. */
static void install_seccomp(void) {
    step = "seccomp";
    if (!policy.seccomp) return;
    struct stat st;
    if (fstat(FILTER_FD, &st) < 0) die("fstat seccomp filter");
    struct sock_filter *prog = malloc(st.st_size);
    if (!prog || pread(FILTER_FD, prog, st.st_size, 0) != st.st_size) die("read seccomp filter");
    close(FILTER_FD);
    struct sock_fprog fprog = {(unsigned short)(st.st_size / sizeof *prog), prog};
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog, 0, 0) < 0) die("install seccomp filter");
}

static void __attribute__((noreturn)) run_task(const char *path, char **argv, char **envp) {
    step = "exec";
    if (setsid() < 0) die("setsid");
    sigset_t none;
    sigemptyset(&none);
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    for (int sig = 1; sig < NSIG; sig++) sigaction(sig, &dfl, NULL);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* Only 0-2 survive: the report pipe is close-on-exec, the seccomp
     * filter's memfd is closed once read. */
    for (int fd = 3; fd < REPORT_FD; fd++) close(fd);
    if (syscall(SYS_close_range, REPORT_FD + 1, policy.seccomp ? FILTER_FD - 1 : ~0U, 0) < 0) {
        for (int fd = REPORT_FD + 1; fd < 1024; fd++)
            if (!(policy.seccomp && fd == FILTER_FD)) close(fd);
    }
    if (policy.seccomp) syscall(SYS_close_range, FILTER_FD + 1, ~0U, 0);
    /* A keyring of its own: nothing of hitz's session keyring is reachable
     * (and the seccomp profile then forbids keyctl altogether). */
    step = "keyring";
    if (syscall(SYS_keyctl, 1 /* KEYCTL_JOIN_SESSION_KEYRING */, NULL) < 0 && errno != ENOSYS)
        die("join a new session keyring");
    limit_resources();
    drop_capabilities();
    restrict_filesystem();
    install_seccomp();
    step = "exec";
    execve(path, argv, envp);
    die(argv[0]);
}

static void __attribute__((noreturn)) init(int network_none, int hold, const char *cwd,
                                           char **argv, char **envp, int to_launcher,
                                           int from_launcher) {
    step = "init";
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0) die("PR_SET_PDEATHSIG");
    /* pid 1 only receives signals it handles: install first, so a timeout's
     * SIGTERM reaches the task. */
    struct sigaction fwd = {.sa_handler = forward};
    sigaction(SIGTERM, &fwd, NULL);

    /* --- privileged over the sandbox's own namespaces ------------------ */
    int flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP;
    if (network_none) flags |= CLONE_NEWNET;
    if (unshare(flags) < 0) die("unshare");
    /* Nothing mounted here may propagate back to the host's mount table. */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) die("make / private");
    /* A scratch tmpfs is the root while building, the host's root under
     * /oldroot, so bind sources stay reachable even where the scratch tmpfs
     * hides them (a project under /tmp). */
    if (mount("tmpfs", SCRATCH, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700") < 0)
        die("mount scratch tmpfs");
    if (chdir(SCRATCH) < 0 || mkdir("newroot", 0755) < 0 || mkdir("oldroot", 0755) < 0)
        die("scratch folders");
    if (mount("newroot", "newroot", NULL, MS_BIND, NULL) < 0) die("bind newroot");
    if (syscall(SYS_pivot_root, ".", "oldroot") < 0) die("pivot_root to scratch");
    if (sethostname("hitz", 4) < 0) die("sethostname");
    if (network_none) loopback_up();
    step = "mount";
    apply_ops();
    step = "init";
    /* Done with the host: drop it, then make the built root the root. */
    if (umount2(OLDROOT, MNT_DETACH) < 0) die("detach the host root");
    if (chdir(NEWROOT) < 0) die("chdir newroot");
    if (syscall(SYS_pivot_root, ".", ".") < 0) die("pivot_root"); /* stacks old under new */
    if (umount2(".", MNT_DETACH) < 0) die("detach the scratch root"); /* and drops it */

    /* --- from here on, only the task's own user namespace ---------------- */
    if (unshare(CLONE_NEWUSER) < 0) die("unshare user namespace");
    char byte = 'U';
    if (write(to_launcher, &byte, 1) != 1) die("ask for id maps");
    if (read(from_launcher, &byte, 1) != 1 || byte != 'M') {
        errno = EPROTO;
        die("wait for id maps");
    }
    if (setresgid(0, 0, 0) < 0 || setresuid(0, 0, 0) < 0) die("become root of the task namespace");
    /* A change of credentials clears the parent-death signal (prctl(2),
     * PR_SET_PDEATHSIG): set it again, then make sure the launcher did not
     * die in between (it holds the other end of from_launcher open until it
     * exits). */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0) die("PR_SET_PDEATHSIG");
    struct pollfd hup = {.fd = from_launcher, .events = POLLIN};
    if (poll(&hup, 1, 0) != 0) _exit(125); /* readable or hung up: the launcher is gone */
    close(to_launcher);
    close(from_launcher);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) die("PR_SET_NO_NEW_PRIVS");
    if (chdir(cwd) < 0) die("chdir to the working folder");

    if (hold) {
        char go;
        ssize_t got;
        while ((got = read(GO_FD, &go, 1)) < 0 && errno == EINTR) {
        }
        if (got != 1 || go != 'G') _exit(0); /* released without a start: cancelled */
        close(GO_FD);
    }

    step = "exec";
    char buf[8192];
    const char *path = resolve(argv[0], envp, buf, sizeof buf);
    if (!path) die(argv[0]);
    pid_t task = fork();
    if (task < 0) die("fork");
    if (task == 0) run_task(path, argv, envp);
    child_pid = task;
    for (int fd = 0; fd <= 2; fd++) close(fd);

    /* Be pid 1: reap every orphan; end when the task itself ends. */
    while (1) {
        int status;
        pid_t pid = wait(&status);
        if (pid < 0 && errno == EINTR) continue;
        if (pid < 0) die("wait");
        if (pid == task) {
            report("X %d", status);
            _exit(0);
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0) die("PR_SET_PDEATHSIG");
    if (getppid() != atoi(argv[1])) return 3; /* hitz died before the line above */
    /* posix_spawn's dup2 cleared close-on-exec on the report pipe; the task
     * must not inherit it. */
    if (fcntl(REPORT_FD, F_SETFD, FD_CLOEXEC) < 0) return 4;
    read_plan();
    /* First of all, join the task's cgroups (memory, pids, cpu limits), so
     * every process the task will ever have is counted. */
    long ncgroups = next_int();
    for (long i = 0; i < ncgroups; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/cgroup.procs", next());
        step = "cgroups";
        write_file(path, "0");
    }
    step = "launcher";
    host_root = next_int();
    outer_id = next_int();
    int network_none = strcmp(next(), "none") == 0;
    int hold = next_int();
    if (hold && fcntl(GO_FD, F_SETFD, FD_CLOEXEC) < 0) return 4;
    const char *cwd = next();
    long task_argc = next_int();
    char **task_argv = calloc(task_argc + 1, sizeof *task_argv);
    for (long i = 0; i < task_argc; i++) task_argv[i] = (char *)next();
    long envc = next_int();
    char **envp = calloc(envc + 1, sizeof *envp);
    for (long i = 0; i < envc; i++) envp[i] = (char *)next();
    if (!task_argv || !envp || task_argc < 1) die("plan");
    policy.keep_caps = strtoull(next(), NULL, 10);
    policy.seccomp = next_int();
    if (policy.seccomp && fcntl(FILTER_FD, F_SETFD, FD_CLOEXEC) < 0) return 4;
    policy.nlimits = next_int();
    if (policy.nlimits < 0 || policy.nlimits > 16) {
        errno = EINVAL;
        die("plan: limits");
    }
    for (int i = 0; i < policy.nlimits; i++) {
        policy.limits[i].resource = next_int();
        policy.limits[i].value = strtoull(next(), NULL, 10);
    }
    landlock.mode = next_int();
    landlock.npaths = next_int();
    landlock.writable = calloc(landlock.npaths + 1, sizeof *landlock.writable);
    if (!landlock.writable) die("malloc");
    for (int i = 0; i < landlock.npaths; i++) landlock.writable[i] = next();

    if (host_root) {
        if (setgroups(0, NULL) < 0) die("setgroups"); /* root's groups must not reach the task */
    } else {
        /* An ordinary user may only create the sandbox's namespaces inside a
         * user namespace of its own, where it is 0. setgroups must be denied
         * before an unprivileged gid_map write (user_namespaces(7)). */
        uid_t uid = getuid();
        gid_t gid = getgid();
        if (unshare(CLONE_NEWUSER) < 0) die("unshare user namespace");
        write_file("/proc/self/setgroups", "deny");
        map_ids(getpid(), uid, gid);
        /* The new credentials cleared the parent-death signal: set it again. */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0) die("PR_SET_PDEATHSIG");
        if (getppid() != atoi(argv[1])) return 3;
    }
    /* The next child becomes pid 1 of a new pid namespace. */
    if (unshare(CLONE_NEWPID) < 0) die("unshare pid namespace");
    int up[2], down[2];
    if (pipe2(up, O_CLOEXEC) < 0 || pipe2(down, O_CLOEXEC) < 0) die("pipe");
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        close(up[0]);
        close(down[1]);
        init(network_none, hold, cwd, task_argv, envp, up[1], down[0]);
    }
    child_pid = pid;
    close(up[1]);
    close(down[0]);
    struct sigaction fwd = {.sa_handler = forward};
    sigaction(SIGTERM, &fwd, NULL);
    for (int fd = 0; fd <= 2; fd++) close(fd);

    /* Init asks for its task namespace's id maps once the root is built; the
     * maps must be written from the parent namespace. */
    char byte;
    ssize_t n;
    while ((n = read(up[0], &byte, 1)) < 0 && errno == EINTR) {
    }
    if (n == 1 && byte == 'U') {
        map_ids(pid, outer_id, outer_id);
        byte = 'M';
        if (write(down[1], &byte, 1) != 1) die("answer init");
    }
    int status;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) die("waitpid");
    }
    return 0;
}
