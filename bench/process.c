/* Finding and running the programs atmoe-bench hands work to (the peer's
 * Python, gnuplot), and the private directory they exchange files in. */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"

extern char **environ;

static int executable(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode) &&
           access(path, X_OK) == 0;
}

char *find_program(const char *env_var, const char *fallback,
                   const char *what)
{
    const char *env = getenv(env_var);
    const char *name = env && *env ? env : fallback;
    if (strchr(name, '/')) {
        errno = 0;
        if (executable(name))
            return strdup(name);
        int e = errno;
        set_error("%s: cannot run %s: %s (set %s to the program)", what, name,
                  e ? strerror(e) : "not an executable file", env_var);
        return NULL;
    }
    const char *path = getenv("PATH");
    char *copy = strdup(path && *path ? path : "/usr/bin:/bin");
    char *save = NULL, *found = NULL;
    for (char *dir = strtok_r(copy, ":", &save); dir && !found;
         dir = strtok_r(NULL, ":", &save)) {
        char cand[PATH_MAX];
        int len = snprintf(cand, sizeof cand, "%s/%s", *dir ? dir : ".", name);
        if (len > 0 && (size_t)len < sizeof cand && executable(cand))
            found = strdup(cand);
    }
    free(copy);
    if (found == NULL)
        set_error("%s: %s is not in PATH (install it, or set %s to the "
                  "program)", what, name, env_var);
    return found;
}

int spawn_program(char *const argv[], pid_t *pid, FILE **out)
{
    int fds[2] = {-1, -1};
    if (out && pipe(fds) != 0)
        return set_error("pipe: %s", strerror(errno));
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY,
                                     0);
    if (out) {
        posix_spawn_file_actions_addclose(&fa, fds[0]);
        posix_spawn_file_actions_adddup2(&fa, fds[1], STDOUT_FILENO);
        posix_spawn_file_actions_addclose(&fa, fds[1]);
    }
    int err = posix_spawn(pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (out)
        close(fds[1]);
    if (err != 0) {
        if (out)
            close(fds[0]);
        return set_error("cannot run %s: %s", argv[0], strerror(err));
    }
    if (out && (*out = fdopen(fds[0], "r")) == NULL) {
        int e = errno;
        close(fds[0]);
        kill(*pid, SIGTERM);
        waitpid(*pid, NULL, 0);
        return set_error("reading from %s: %s", argv[0], strerror(e));
    }
    return 0;
}

int wait_program(pid_t pid)
{
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return set_error("waiting for a program: %s", strerror(errno));
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

char *make_temp_dir(void)
{
    const char *base = getenv("TMPDIR");
    if (base == NULL || *base == '\0')
        base = "/tmp";
    size_t len = strlen(base) + 32;
    char *dir = xcalloc(len, 1);
    snprintf(dir, len, "%s/atmoe-bench.XXXXXX", base);
    if (mkdtemp(dir) == NULL) {
        set_error("cannot make a directory in %s: %s", base, strerror(errno));
        free(dir);
        return NULL;
    }
    return dir;
}

void remove_temp_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            char path[PATH_MAX];
            int len = snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            if (len > 0 && (size_t)len < sizeof path)
                unlink(path);
        }
        closedir(d);
    }
    rmdir(dir);
}
