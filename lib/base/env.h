/* The process environment and the user's directories, in one place: the
 * variables the library reads, the XDG locations derived from them, and the
 * creation of directories below them.  Nothing here reports an error to a
 * sink: callers decide whether a missing location is a failure of theirs
 * (atmoe_tuning_get_user_path) or nothing to mention (a context made
 * without a user database). */
#ifndef ATMOE_ENV_H
#define ATMOE_ENV_H

#include <stddef.h>
#include <sys/types.h>

typedef enum atm_env_var {
    ATM_ENV_NONE,                /* for tables: a row without a variable */
    ATM_ENV_DEVICE,              /* ATMOE_DEVICE */
    ATM_ENV_KERNEL_DIR,          /* ATMOE_KERNEL_DIR */
    ATM_ENV_CACHE_DIR,           /* ATMOE_CACHE_DIR */
    ATM_ENV_LINEAR_MAX_TOKENS,   /* ATMOE_LINEAR_MAX_TOKENS */
    ATM_ENV_LINEAR_VARIANT,      /* ATMOE_LINEAR_VARIANT */
    ATM_ENV_PARAMS,              /* ATMOE_PARAMS */
    ATM_ENV_TUNING_FILE,         /* ATMOE_TUNING_FILE */
    ATM_ENV_TUNING_SYSTEM_FILE,  /* ATMOE_TUNING_SYSTEM_FILE */
    ATM_ENV_XDG_CACHE_HOME,
    ATM_ENV_XDG_DATA_HOME,
    ATM_ENV_HOME,
    ATM_ENV_TEST_FAIL_ALLOC,     /* ATMOE_TEST_FAIL_ALLOC: tests only */
    ATM_ENV_MIXTURE_VARIANT,     /* ATMOE_MIXTURE_VARIANT */
    ATM_ENV_LINEAR_TILE_MIN_TOKENS, /* ATMOE_LINEAR_TILE_MIN_TOKENS */
    ATM_ENV_COUNT_
} atm_env_var;

/* "ATMOE_DEVICE"; "" for ATM_ENV_NONE and values outside the list. */
const char *atm_env_name(atm_env_var var);

/* The variable's value now, NULL when it is unset (or var is
 * ATM_ENV_NONE): the library's one call of getenv. */
const char *atm_env_get(atm_env_var var);

typedef enum atm_path_status {
    ATM_PATH_OK,
    ATM_PATH_EMPTY,    /* the library's own variable is set but empty */
    ATM_PATH_NONE,     /* neither it, the XDG variable nor HOME is set */
    ATM_PATH_TOO_LONG  /* *need holds the bytes the path takes */
} atm_path_status;

/* The directory of the disk program cache: $ATMOE_CACHE_DIR, else
 * $XDG_CACHE_HOME/atmoe when that is an absolute path, else
 * $HOME/.cache/atmoe.  out is "" unless the status is ATM_PATH_OK. */
atm_path_status atm_env_cache_dir(char *out, size_t size, size_t *need);

/* The user's tuning database: $ATMOE_TUNING_FILE, else
 * $XDG_DATA_HOME/atmoe/tuning.json when that is an absolute path, else
 * $HOME/.local/share/atmoe/tuning.json. */
atm_path_status atm_env_tuning_user_path(char *out, size_t size,
                                         size_t *need);

/* The system's tuning database: $ATMOE_TUNING_SYSTEM_FILE, else the copy
 * installed with the library. */
const char *atm_env_tuning_system_path(void);

/* mkdir -p dir with mode for the directories it makes; -1 with errno set
 * when a component cannot be made or the last one is not a directory. */
int atm_mkdir_p(const char *dir, mode_t mode);

/* atm_mkdir_p of the directory that holds path ("" and "/" hold nothing
 * to make). */
int atm_mkdir_parent(const char *path, mode_t mode);

#endif
