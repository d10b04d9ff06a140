#!/bin/sh
# The install-time tuning that `make install` runs (Makefile.am's
# install-data-hook): atmoe-tune --effort EFFORT --all-devices into the
# installed system database, which then holds the shipped entries and one
# tuned entry per device present.
#
#   install-tuning.sh DESTDIR ENABLED TUNER DATABASE EFFORT
#
# Skipped (exit 0, with a line saying why) when DESTDIR is set (a package
# is being built: the machine it will run on is not this one, and the
# packager runs the tuner in a post-install step), when ENABLED is not yes
# (configure --disable-install-tuning), and when ATMOE_INSTALL_TUNING=0.
# A tuner that fails leaves the shipped database and warns: the library
# works untuned, so the install does not fail for it.
set -u
destdir=$1 enabled=$2 tuner=$3 db=$4 effort=$5

if [ -n "$destdir" ]; then
    echo "atmoe: install-time tuning skipped: installing into DESTDIR" \
        "($destdir); run 'atmoe-tune --effort quick --all-devices" \
        "--output <pkgdatadir>/tuning.json' after installing on the target"
    exit 0
fi
if [ "$enabled" != yes ]; then
    echo "atmoe: install-time tuning skipped: configured with" \
        "--disable-install-tuning"
    exit 0
fi
if [ "${ATMOE_INSTALL_TUNING-}" = 0 ]; then
    echo "atmoe: install-time tuning skipped: ATMOE_INSTALL_TUNING=0"
    exit 0
fi
echo "atmoe: tuning every OpenCL device present (--effort $effort) into $db;" \
    "ATMOE_INSTALL_TUNING=0 skips this"
# --resume: an install interrupted during tuning continues where it was.
if ! ATMOE_PARAMS=default "$tuner" --effort "$effort" --all-devices \
        --resume --output "$db"; then
    echo "atmoe: warning: install-time tuning failed; $db holds the" \
        "shipped defaults (run atmoe-tune by hand to tune)" >&2
fi
exit 0
