/* hitz-docker-init: the first program of a docker-backend task, between
 * Docker's init (pid 1) and the task.
 *
 *   hitz-docker-init MODE N PATH1..PATHN K NAME1..NAMEK -- ARGV...
 *
 * Why it exists:
 *  - Starting a container costs ~0.15 s of the engine's time (runc create
 *    and start). hitz starts the container ahead, while other tasks still
 *    run, and this program holds it: it waits for one byte on stdin (hitz
 *    sends it through the attach connection when the task is released). End
 *    of file instead means the task was cancelled: it exits 125 silently.
 *  - Docker knows no Landlock. MODE 1 (required) or 2 (best effort) applies
 *    the namespace sandbox launcher's rules, with its code (landlock.h):
 *    read and execute beneath /, write only beneath PATH1..PATHN (the
 *    output folders, /tmp, /dev/shm) and to the harmless devices; with
 *    ABI 6 no abstract unix socket and no signal reaches outside the task.
 *    MODE 0: no Landlock.
 *
 *  - Docker adds variables of its own (HOSTNAME, the image's ENV) to the
 *    container's environment; the task gets only NAME1..NAMEK, the ones
 *    hitz declared.
 *
 * Then stdin becomes /dev/null and ARGV is executed (PATH lookup as execvp).
 * A failed step is reported on stderr as "\0hitz-init: STEP ERRNO TEXT\n"
 * with exit status 125, which hitz turns into a set-up failure in words.
 * Built static by hitz with the host's C compiler, bound read-only into
 * the container: it works in any image, even one without a C library.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "landlock.h"

static void fail(const char *step, int err, const char *text) {
    dprintf(2, "%chitz-init: %s %d %s\n", 0, step, err, text);
    _exit(125);
}

static pid_t child;

static void forward(int sig) {
    kill(-child, sig);
}

/* Keep only the declared variables, in place. */
static void keep_environment(int nkeys, char **keys) {
    extern char **environ;
    char **out = environ;
    for (char **var = environ; *var; var++) {
        size_t len = strcspn(*var, "=");
        for (int i = 0; i < nkeys; i++) {
            if (strlen(keys[i]) == len && strncmp(*var, keys[i], len) == 0) {
                *out++ = *var;
                break;
            }
        }
    }
    *out = NULL;
}

int main(int argc, char **argv) {
    if (argc < 5) fail("usage", EINVAL, "hitz-docker-init MODE N PATHS... K NAMES... -- ARGV...");
    int mode = atoi(argv[1]);
    int npaths = atoi(argv[2]);
    if (npaths < 0 || 4 + npaths >= argc) fail("usage", EINVAL, "malformed arguments");
    char **paths = argv + 3;
    int nkeys = atoi(argv[3 + npaths]);
    char **keys = argv + 4 + npaths;
    if (nkeys < 0 || 4 + npaths + nkeys >= argc || strcmp(keys[nkeys], "--") != 0)
        fail("usage", EINVAL, "malformed arguments");
    char **task = keys + nkeys + 1;
    if (!task[0]) fail("usage", EINVAL, "no command");

    char go;
    ssize_t got;
    do got = read(0, &go, 1); while (got < 0 && errno == EINTR);
    if (got != 1) _exit(125); /* cancelled before it was released */

    int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null < 0 || dup2(null, 0) < 0) fail("stdin", errno, "/dev/null");
    close(null);
    /* A session of its own, as in the namespace sandbox: no controlling
     * terminal, and no job control reaching outside the task. Docker's
     * init started us as a process group leader of our own, which setsid()
     * refuses (EPERM): then a child continues as the task. */
    if (setsid() < 0) {
        child = fork();
        if (child < 0) fail("setsid", errno, "fork");
        if (child > 0) {
            /* Signals for the task (Docker's init forwards SIGTERM on
             * timeout) go on to its whole session. */
            static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
            for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++)
                signal(forwarded[i], forward);
            int status;
            while (waitpid(child, &status, 0) < 0 && errno == EINTR) {}
            if (WIFSIGNALED(status)) {
                signal(WTERMSIG(status), SIG_DFL);
                kill(getpid(), WTERMSIG(status));
            }
            _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
        }
        if (setsid() < 0) fail("setsid", errno, "setsid");
    }
    keep_environment(nkeys, keys);
    /* Docker set no_new_privs (security-opt no-new-privileges), which
     * landlock_restrict_self requires of an unprivileged process. */
    const char *failed;
    if (landlock_confine(mode, npaths, (const char *const *)paths, &failed) < 0)
        fail("landlock", errno, failed);
    execvp(task[0], task);
    fail("exec", errno, task[0]);
    return 125;
}
