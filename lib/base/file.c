#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/file.h"

FILE *atm_file_begin(const char *path, char *tmp, size_t tmp_size)
{
    if ((size_t)snprintf(tmp, tmp_size, "%s.XXXXXX", path) >= tmp_size) {
        errno = ENAMETOOLONG;
        return NULL;
    }
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
