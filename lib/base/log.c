#include <config.h>

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>

#include "base/log.h"

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static atmoe_log_fn log_fn;
static void *log_user;
static atmoe_log_level log_min_level = ATMOE_LOG_ERROR;

ATMOE_API atmoe_status atmoe_log_set(atmoe_log_fn fn, void *user,
                                     atmoe_log_level min_level)
{
    if ((unsigned)min_level > ATMOE_LOG_ERROR)
        return atm_errsink_fail(atm_errsink_thread(),
                                ATMOE_STATUS_INVALID_ARGUMENT,
                                "atmoe_log_set: min_level %d is not an "
                                "atmoe_log_level", (int)min_level);
    pthread_mutex_lock(&log_lock);
    log_fn = fn;
    log_user = user;
    log_min_level = min_level;
    pthread_mutex_unlock(&log_lock);
    return ATMOE_STATUS_OK;
}

void atm_log(atmoe_log_level level, const char *fmt, ...)
{
    pthread_mutex_lock(&log_lock);
    atmoe_log_fn fn = log_fn;
    void *user = log_user;
    int wanted = fn != NULL && level >= log_min_level;
    pthread_mutex_unlock(&log_lock);
    if (!wanted)
        return;

    char message[ATM_ERRMSG_SIZE];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    fn(level, message, user);
}
