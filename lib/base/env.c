#include <config.h>

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/env.h"

static const char *const env_names[ATM_ENV_COUNT_] = {
    [ATM_ENV_NONE] = "",
    [ATM_ENV_DEVICE] = "ATMOE_DEVICE",
    [ATM_ENV_KERNEL_DIR] = "ATMOE_KERNEL_DIR",
    [ATM_ENV_CACHE_DIR] = "ATMOE_CACHE_DIR",
    [ATM_ENV_LINEAR_MAX_TOKENS] = "ATMOE_LINEAR_MAX_TOKENS",
    [ATM_ENV_LINEAR_VARIANT] = "ATMOE_LINEAR_VARIANT",
    [ATM_ENV_PARAMS] = "ATMOE_PARAMS",
    [ATM_ENV_TUNING_FILE] = "ATMOE_TUNING_FILE",
    [ATM_ENV_TUNING_SYSTEM_FILE] = "ATMOE_TUNING_SYSTEM_FILE",
    [ATM_ENV_XDG_CACHE_HOME] = "XDG_CACHE_HOME",
    [ATM_ENV_XDG_DATA_HOME] = "XDG_DATA_HOME",
    [ATM_ENV_HOME] = "HOME",
    [ATM_ENV_TEST_FAIL_ALLOC] = "ATMOE_TEST_FAIL_ALLOC",
    [ATM_ENV_MIXTURE_VARIANT] = "ATMOE_MIXTURE_VARIANT",
    [ATM_ENV_LINEAR_TILE_MIN_TOKENS] = "ATMOE_LINEAR_TILE_MIN_TOKENS",
};

const char *atm_env_name(atm_env_var var)
{
    if ((unsigned)var >= ATM_ENV_COUNT_)
        return "";
    return env_names[var];
}

const char *atm_env_get(atm_env_var var)
{
    if (var == ATM_ENV_NONE || (unsigned)var >= ATM_ENV_COUNT_)
        return NULL;
    return getenv(env_names[var]);
}

/* A per-user location as XDG lays them out: the library's own variable
 * names it outright; else <XDG variable>/<leaf>, an XDG variable that is
 * not an absolute path being ignored as the specification says; else
 * $HOME/<home_dir>/<leaf>. */
static atm_path_status user_path(atm_env_var own, atm_env_var xdg,
                                 const char *home_dir, const char *leaf,
                                 char *out, size_t size, size_t *need)
{
    const char *value = atm_env_get(own);
    const char *base = atm_env_get(xdg);
    const char *home = atm_env_get(ATM_ENV_HOME);
    int n;
    if (size > 0)
        out[0] = '\0';
    if (value && *value == '\0')
        return ATM_PATH_EMPTY;
    if (value)
        n = snprintf(out, size, "%s", value);
    else if (base && base[0] == '/')
        n = snprintf(out, size, "%s/%s", base, leaf);
    else if (home && *home)
        n = snprintf(out, size, "%s/%s/%s", home, home_dir, leaf);
    else
        return ATM_PATH_NONE;
    if (n < 0 || (size_t)n >= size) {
        if (size > 0)
            out[0] = '\0';
        if (need)
            *need = n < 0 ? 0 : (size_t)n + 1;
        return ATM_PATH_TOO_LONG;
    }
    return ATM_PATH_OK;
}

atm_path_status atm_env_cache_dir(char *out, size_t size, size_t *need)
{
    return user_path(ATM_ENV_CACHE_DIR, ATM_ENV_XDG_CACHE_HOME, ".cache",
                     "atmoe", out, size, need);
}

atm_path_status atm_env_tuning_user_path(char *out, size_t size,
                                         size_t *need)
{
    return user_path(ATM_ENV_TUNING_FILE, ATM_ENV_XDG_DATA_HOME,
                     ".local/share", "atmoe/tuning.json", out, size, need);
}

const char *atm_env_tuning_system_path(void)
{
    const char *env = atm_env_get(ATM_ENV_TUNING_SYSTEM_FILE);
    return env ? env : ATMOE_TUNING_SYSTEM_PATH;
}

static int make_one(const char *dir, mode_t mode)
{
    return mkdir(dir, mode) != 0 && errno != EEXIST ? -1 : 0;
}

int atm_mkdir_p(const char *dir, mode_t mode)
{
    char path[PATH_MAX];
    size_t n = strlen(dir);
    if (n == 0 || n >= sizeof path) {
        errno = n ? ENAMETOOLONG : ENOENT;
        return -1;
    }
    memcpy(path, dir, n + 1);
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (make_one(path, mode) != 0)
            return -1;
        *p = '/';
    }
    if (make_one(path, mode) != 0)
        return -1;
    /* EEXIST also answers for a file of that name. */
    struct stat sb;
    if (stat(path, &sb) != 0)
        return -1;
    if (!S_ISDIR(sb.st_mode)) {
        errno = ENOTDIR;
        return -1;
    }
    return 0;
}

int atm_mkdir_parent(const char *path, mode_t mode)
{
    char dir[PATH_MAX];
    if (snprintf(dir, sizeof dir, "%s", path) >= (int)sizeof dir) {
        errno = ENAMETOOLONG;
        return -1;
    }
    char *slash = strrchr(dir, '/');
    if (slash == NULL || slash == dir)
        return 0;
    *slash = '\0';
    return atm_mkdir_p(dir, mode);
}
