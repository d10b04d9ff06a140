/* Tuned kernel parameters kept as data: a JSON database of entries keyed by
 * device, vendor, type and driver, each holding CLBlast kernel parameter
 * sets ("clblast": kernel -> name -> value) and the parameters of the
 * library's own programs ("kernels": program -> name -> value), which
 * params.h lists and atm_param_get gives.
 *
 * Two copies are read: the system one installed with the library
 * ($(pkgdatadir)/tuning.json, or ATMOE_TUNING_SYSTEM_FILE) and the user's
 * ($ATMOE_TUNING_FILE, else $XDG_DATA_HOME/atmoe/tuning.json, else
 * $HOME/.local/share/atmoe/tuning.json).  A user entry replaces the system
 * entry with the same key.  For every kernel, the most specific entry that
 * lists it wins: device and driver, then the device under any driver, then
 * the vendor and device type -- the order CLBlast's own database uses.
 *
 * A file that cannot be read as a database is logged as a warning and
 * ignored as a whole, so that a hand edit gone wrong never stops the
 * library; a misspelt parameter of a "kernels" section, or one out of its
 * range, is logged and ignored alone.  atmoe_tuning_check() says what is
 * wrong with either.
 *
 * CLBlast keeps parameter overrides per OpenCL device for the whole process
 * (CLBlastOverrideParameters), not per context, and offers no way back to
 * its built-in values: once a context has applied a set, every context on
 * that device uses it until another set replaces it. */
#ifndef ATMOE_TUNING_H
#define ATMOE_TUNING_H

#include "device/context.h"
#include "device/params.h" /* atm_param_get */

/* Applies the tuned parameters at context creation, unless ATMOE_PARAMS
 * says "default", and resolves the values atm_param_get gives.  Never
 * fails and leaves no message: problems are logged and tuning is then
 * partly or wholly skipped. */
void atm_tuning_init(atmoe_context *ctx);

/* Releases what atm_tuning_init kept in the context. */
void atm_tuning_release(atmoe_context *ctx);

#endif
