/* Files written whole or not at all: a temporary file beside the target,
 * renamed over it once complete, so that no reader (another process
 * sharing a cache, a user's viewer) ever sees a half-written file. */
#ifndef ATMOE_FILE_H
#define ATMOE_FILE_H

#include <stdio.h>

/* Bytes a temporary's name takes beyond its path's (and the NUL). */
#define ATM_FILE_TMP_EXTRA 32

/* Opens a new temporary file beside path, named <path>.atmoe-<pid>-XXXXXX
 * (the name goes to tmp, of tmp_size >= strlen(path) + ATM_FILE_TMP_EXTRA
 * bytes), after removing the stale temporaries of that naming a killed
 * writer left for path (its pid dead and the file a minute unchanged, or
 * a day unchanged).  NULL with errno set on failure. */
FILE *atm_file_begin(const char *path, char *tmp, size_t tmp_size);

/* Closes f and renames tmp over path; ok says whether everything written
 * to f went well.  On any failure the temporary file is removed and -1
 * returned with errno set. */
int atm_file_commit(FILE *f, const char *tmp, const char *path, int ok);

/* Opens path for reading if it is a regular file: a descriptor, and its
 * size in *size (may be NULL); -1 with errno set otherwise (EISDIR for a
 * directory, EINVAL for a FIFO, device or socket), without waiting on a
 * FIFO. */
int atm_file_open_fd(const char *path, size_t *size);

/* The same as a stream. */
FILE *atm_file_open_regular(const char *path);

/* strerror for the errors above: "not a regular file" for EINVAL. */
const char *atm_file_strerror(int e);

#endif
