#include <config.h>

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "base/file.h"

#define TMP_TAG ".atmoe-"

/* Whether name (in the directory of path) is a temporary of ours for
 * path: <base>.atmoe-<pid>-XXXXXX; its writer's pid goes to *pid. */
static int our_temporary(const char *name, const char *base, size_t base_len,
                         long *pid)
{
    if (strncmp(name, base, base_len) != 0 ||
        strncmp(name + base_len, TMP_TAG, strlen(TMP_TAG)) != 0)
        return 0;
    const char *p = name + base_len + strlen(TMP_TAG);
    char *end;
    errno = 0;
    long v = strtol(p, &end, 10);
    if (end == p || *end != '-' || errno != 0 || v <= 0)
        return 0;
    if (strlen(end + 1) != 6)
        return 0;
    for (const char *c = end + 1; *c; c++)
        if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'z') ||
              (*c >= 'A' && *c <= 'Z')))
            return 0;
    *pid = v;
    return 1;
}

/* Removes the temporaries a killed writer left beside path.  One is stale
 * when its writer's pid is dead here and the file has not changed for a
 * minute (the minute spares a writer on another host sharing the
 * directory), or when it has not changed for a day (the pid reused).  A
 * live writer's file changes as it writes, and is left alone; so are files
 * of other users and names not of our making. */
static void remove_stale(const char *path)
{
    char dir[PATH_MAX], full[PATH_MAX];
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    size_t dir_len = slash ? (size_t)(slash - path) : 0;
    if (dir_len >= sizeof dir)
        return;
    if (slash) {
        memcpy(dir, path, dir_len);
        dir[dir_len] = '\0';
        if (dir_len == 0)
            strcpy(dir, "/");
    } else {
        strcpy(dir, ".");
    }
    DIR *d = opendir(dir);
    if (d == NULL)
        return;
    size_t base_len = strlen(base);
    time_t now = time(NULL);
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        long pid;
        if (!our_temporary(de->d_name, base, base_len, &pid))
            continue;
        if ((size_t)snprintf(full, sizeof full, "%s/%s", dir, de->d_name) >=
            sizeof full)
            continue;
        struct stat sb;
        if (lstat(full, &sb) != 0 || !S_ISREG(sb.st_mode) ||
            sb.st_uid != geteuid())
            continue;
        double idle = difftime(now, sb.st_mtime);
        int dead = pid != (long)getpid() && kill((pid_t)pid, 0) != 0 &&
                   errno == ESRCH;
        if ((dead && idle >= 60) || idle >= 24 * 3600)
            unlink(full);
    }
    closedir(d);
}

FILE *atm_file_begin(const char *path, char *tmp, size_t tmp_size)
{
    if ((size_t)snprintf(tmp, tmp_size, "%s" TMP_TAG "%ld-XXXXXX", path,
                         (long)getpid()) >= tmp_size) {
        errno = ENAMETOOLONG;
        return NULL;
    }
    remove_stale(path);
    int fd = mkstemp(tmp);
    if (fd < 0)
        return NULL;
    /* mkstemp makes the file private; the result is an ordinary file. */
    fchmod(fd, 0644);
    FILE *f = fdopen(fd, "wb");
    if (f == NULL) {
        int e = errno;
        close(fd);
        unlink(tmp);
        errno = e;
    }
    return f;
}

int atm_file_commit(FILE *f, const char *tmp, const char *path, int ok)
{
    int e = 0;
    if (ferror(f) || !ok)
        e = errno ? errno : EIO;
    /* On disk before the rename: after a crash the name holds the old
     * file or the whole new one, never an empty one. */
    if (e == 0 && (fflush(f) != 0 || fsync(fileno(f)) != 0))
        e = errno;
    if (fclose(f) != 0 && e == 0)
        e = errno;
    if (e == 0 && rename(tmp, path) != 0)
        e = errno;
    if (e != 0) {
        unlink(tmp);
        errno = e;
        return -1;
    }
    return 0;
}

int atm_file_open_fd(const char *path, size_t *size)
{
    /* O_NONBLOCK: opening a FIFO for reading would wait for a writer. */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return -1;
    struct stat sb;
    int e = 0;
    if (fstat(fd, &sb) != 0)
        e = errno;
    else if (S_ISDIR(sb.st_mode))
        e = EISDIR;
    else if (!S_ISREG(sb.st_mode))
        e = EINVAL;
    else if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0)
        e = errno;
    if (e) {
        close(fd);
        errno = e;
        return -1;
    }
    if (size)
        *size = (size_t)sb.st_size;
    return fd;
}

FILE *atm_file_open_regular(const char *path)
{
    int fd = atm_file_open_fd(path, NULL);
    FILE *f = fd >= 0 ? fdopen(fd, "rb") : NULL;
    if (f == NULL && fd >= 0) {
        int e = errno;
        close(fd);
        errno = e;
    }
    return f;
}

const char *atm_file_strerror(int e)
{
    return e == EINVAL ? "not a regular file" : strerror(e);
}
