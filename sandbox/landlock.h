/* landlock.h: the Landlock rules of a hitz task, for both backends.
 *
 * Included by the namespace sandbox's launcher (namespace/launcher.c) and
 * the docker backend's container init (docker_init.c), so a task is
 * confined by the same rules whichever backend runs it. Each program is
 * compiled alone, hence static functions. build.py names each binary by
 * the digest of its source and of the files it includes with quotes: a
 * change here rebuilds both.
 *
 * The rules: read and execute beneath /, write only beneath the paths the
 * caller names (the output folders, /tmp, /dev/shm) and to the harmless
 * devices; with ABI 6 no abstract unix socket and no signal reaches outside
 * the task. TCP stays unrestricted: the task's own loopback is its to use,
 * and without network = "host" there is nothing else.
 *
 * Defined here rather than taken from <linux/landlock.h>: the kernel headers
 * of older distributions lack the later ABIs (truncate: 3, ioctl on
 * devices: 5, scopes: 6). The system call numbers are the same on every
 * architecture (they were added after the tables were unified).
 */
#ifndef HITZ_LANDLOCK_H
#define HITZ_LANDLOCK_H

#include <errno.h>
#include <fcntl.h>
#include <linux/types.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <unistd.h>

#define LL_CREATE_RULESET 444
#define LL_ADD_RULE 445
#define LL_RESTRICT_SELF 446
#define LL_CREATE_RULESET_VERSION 1
#define LL_RULE_PATH_BENEATH 1
#define LL_FS_EXECUTE (1ULL << 0)
#define LL_FS_WRITE_FILE (1ULL << 1)
#define LL_FS_READ_FILE (1ULL << 2)
#define LL_FS_READ_DIR (1ULL << 3)
/* remove dir, remove file, make char, dir, reg, sock, fifo, block, sym */
#define LL_FS_MAKE_AND_REMOVE (0x1FFULL << 4)
#define LL_FS_REFER (1ULL << 13)     /* ABI 2 */
#define LL_FS_TRUNCATE (1ULL << 14)  /* ABI 3 */
#define LL_FS_IOCTL_DEV (1ULL << 15) /* ABI 5 */
#define LL_SCOPE_ABSTRACT_UNIX_SOCKET (1ULL << 0) /* ABI 6 */
#define LL_SCOPE_SIGNAL (1ULL << 1)               /* ABI 6 */

/* MODE, as hitz passes it to both programs (sandbox/landlock.py). */
#define LL_MODE_OFF 0
#define LL_MODE_REQUIRED 1
#define LL_MODE_BEST_EFFORT 2 /* where the kernel has none, hitz reports it as weakened */

struct ll_ruleset_attr {
    __u64 handled_access_fs;
    __u64 handled_access_net;
    __u64 scoped;
};
struct ll_path_beneath {
    __u64 allowed_access;
    __s32 parent_fd;
} __attribute__((packed));

/* Close fd, keeping the errno of the failure being reported. */
static void ll_close_keep_errno(int fd) {
    int err = errno;
    close(fd);
    errno = err;
}

/* Allow access beneath path. A path the sandbox does not have is skipped:
 * nothing can be written there anyway. */
static int ll_allow_beneath(int ruleset, const char *path, __u64 access, const char **failed) {
    struct ll_path_beneath rule = {access, open(path, O_PATH | O_CLOEXEC)};
    if (rule.parent_fd < 0) {
        if (errno == ENOENT) return 0;
        *failed = path;
        return -1;
    }
    if (syscall(LL_ADD_RULE, ruleset, LL_RULE_PATH_BENEATH, &rule, 0) < 0) {
        ll_close_keep_errno(rule.parent_fd);
        *failed = "landlock_add_rule";
        return -1;
    }
    close(rule.parent_fd);
    return 0;
}

/* Confine this process (and what it executes) to the rules above, writing
 * only beneath writable[0..nwritable-1]. Returns 0 when confined, or when
 * MODE says not to be (off; best effort on a kernel without Landlock).
 * Returns -1 with errno set and *failed naming the call or path that
 * failed; "Landlock is not available" when MODE requires it and the kernel
 * has none. landlock_restrict_self(2) needs no_new_privs (or CAP_SYS_ADMIN):
 * the caller sets it first. */
static int landlock_confine(int mode, int nwritable, const char *const *writable,
                            const char **failed) {
    if (mode == LL_MODE_OFF) return 0;
    int abi = syscall(LL_CREATE_RULESET, NULL, 0, LL_CREATE_RULESET_VERSION);
    if (abi < 1) {
        if (mode == LL_MODE_BEST_EFFORT) return 0;
        *failed = "Landlock is not available";
        return -1;
    }
    __u64 read = LL_FS_EXECUTE | LL_FS_READ_FILE | LL_FS_READ_DIR;
    __u64 write = LL_FS_WRITE_FILE | LL_FS_MAKE_AND_REMOVE;
    if (abi >= 2) write |= LL_FS_REFER;
    if (abi >= 3) write |= LL_FS_TRUNCATE;
    __u64 devices = LL_FS_WRITE_FILE | LL_FS_READ_FILE | (abi >= 3 ? LL_FS_TRUNCATE : 0) |
                    (abi >= 5 ? LL_FS_IOCTL_DEV : 0);
    struct ll_ruleset_attr attr = {read | write | (abi >= 5 ? LL_FS_IOCTL_DEV : 0), 0,
                                   abi >= 6 ? LL_SCOPE_ABSTRACT_UNIX_SOCKET | LL_SCOPE_SIGNAL : 0};
    /* The kernel takes the struct as long as this ABI knows it: without
     * handled_access_net before ABI 4, without scoped before ABI 6. */
    size_t size = abi >= 6 ? sizeof attr : abi >= 4 ? 2 * sizeof(__u64) : sizeof(__u64);
    int ruleset = syscall(LL_CREATE_RULESET, &attr, size, 0);
    if (ruleset < 0) {
        *failed = "landlock_create_ruleset";
        return -1;
    }
    static const char *const devs[] = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random",
                                       "/dev/urandom"};
    int ok = ll_allow_beneath(ruleset, "/", read, failed) == 0;
    for (int i = 0; ok && i < nwritable; i++)
        ok = ll_allow_beneath(ruleset, writable[i], read | write, failed) == 0;
    for (size_t i = 0; ok && i < sizeof devs / sizeof *devs; i++)
        ok = ll_allow_beneath(ruleset, devs[i], devices, failed) == 0;
    if (ok && syscall(LL_RESTRICT_SELF, ruleset, 0) < 0) {
        *failed = "landlock_restrict_self";
        ok = 0;
    }
    ll_close_keep_errno(ruleset);
    return ok ? 0 : -1;
}

#endif /* HITZ_LANDLOCK_H */
