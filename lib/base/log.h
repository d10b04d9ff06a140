/* The process-wide log callback (atmoe_log_set). */
#ifndef ATMOE_LOG_H
#define ATMOE_LOG_H

#include "atmoe.h"
#include "base/error.h"

void atm_log(atmoe_log_level level, const char *fmt, ...) ATM_PRINTF(2, 3);

#endif
