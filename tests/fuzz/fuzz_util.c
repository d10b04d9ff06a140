#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuzz_util.h"

static char dir[128];

/* Removes the directory and what the targets wrote in it (two levels). */
static void remove_dir(void)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        return;
}

const char *fuzz_path(char *out, size_t size, const char *name)
{
    if (dir[0] == '\0') {
        const char *t = getenv("TMPDIR");
        snprintf(dir, sizeof dir, "%s/atmoe-fuzz-XXXXXX", t && *t ? t : "/tmp");
        REQUIRE(mkdtemp(dir) != NULL);
        atexit(remove_dir);
    }
    REQUIRE((size_t)snprintf(out, size, "%s/%s", dir, name) < size);
    return out;
}

void fuzz_write(const char *path, const void *data, size_t size)
{
    FILE *f = fopen(path, "wb");
    REQUIRE(f != NULL);
    REQUIRE(size == 0 || fwrite(data, 1, size, f) == size);
    REQUIRE(fclose(f) == 0);
}

void fuzz_mkdir(const char *path)
{
    REQUIRE(mkdir(path, 0700) == 0 || errno == EEXIST);
}
