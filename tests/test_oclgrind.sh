#!/bin/sh
# `make check-oclgrind`: the linear route's variants under oclgrind
# --data-races --check-api, at odd shapes over every storage type (the
# "oclgrind" case of tests/test_moe: T = 11, 1 and 4 over d_in 97 and
# d_out 41 with W0, A_all and B_all in f32, f16 and bf16, and a CLBlast and
# merged route at 31 tokens; the "layer" case of tests/test_mor1e, whose
# batches include 2 tokens).  Each runs with
#   cpu      the CPU-shaped variant,
#   group    the group variant on its defaults (128 work-items, 4 rows a
#            group),
#   group32  the group variant with 32 work-items and 3 rows
#            (tests/oclgrind/tuning.json: d_in is no multiple of the group,
#            d_out none of the rows),
# those three with the tile variant off, and
#   tile     the tile variant for every batch on its default tile (64 x 64
#            outputs a group, k by 16, 4 x 4 a work-item: each shape a
#            partial tile),
#   tile-odd the tile variant from 2 tokens on the odd tile of
#            tests/oclgrind/tuning.json (6 tokens x 9 rows, k by 5, 2 x 3 a
#            work-item: several tiles each way, partial ones at every
#            edge), single tokens on the group variant of that file.
# Oclgrind's own platform is the only one its launcher shows the program.
#
# Passes when every run's check suite passes and oclgrind reports nothing.
# CLBlast releases its cached programs after oclgrind's runtime has gone,
# at exit, which aborts in oclgrind's ~Program (not in the library): the
# verdict is therefore the suite's summary line and oclgrind's reports,
# not the exit status.  Logs: tests/oclgrind-*.log.
set -u
: "${OCLGRIND:=oclgrind}"
srcdir=${srcdir:-.}
if ! command -v "$OCLGRIND" > /dev/null 2>&1; then
    echo "no $OCLGRIND: skipped"
    exit 77
fi
LD_LIBRARY_PATH=$(pwd)/lib/.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
CK_FORK=no
ATMOE_TUNING_FILE=
ATMOE_CACHE_DIR=$(pwd)/tests/program-cache-oclgrind
export LD_LIBRARY_PATH CK_FORK ATMOE_TUNING_FILE ATMOE_CACHE_DIR
failed=0
for prog in test_moe:oclgrind test_mor1e:layer; do
    t=${prog%%:*}
    case_=${prog#*:}
    for config in cpu group group32 tile tile-odd; do
        log=tests/oclgrind-$t-$config.log
        variant=1
        tile=1000000000
        db=$srcdir/data/tuning.json
        case $config in
        cpu) variant=0 ;;
        group32) db=$srcdir/tests/oclgrind/tuning.json ;;
        tile) tile=1 ;;
        tile-odd) tile=2 db=$srcdir/tests/oclgrind/tuning.json ;;
        esac
        ATMOE_LINEAR_VARIANT=$variant ATMOE_LINEAR_TILE_MIN_TOKENS=$tile \
            ATMOE_TUNING_SYSTEM_FILE=$db CK_RUN_CASE=$case_ \
            "$OCLGRIND" --data-races --check-api "./tests/.libs/$t" \
            > "$log" 2>&1
        reports=$(grep -c -E 'data race|Invalid (read|write)|runtime error|out of bounds|divergence' "$log")
        if ! grep -q -E '^100%: Checks: [0-9]+, Failures: 0, Errors: 0' "$log"; then
            echo "FAIL: $t ($case_, $config): the suite failed under oclgrind (see $log)"
            failed=1
        elif [ "$reports" -ne 0 ]; then
            echo "FAIL: $t ($case_, $config): oclgrind reported $reports errors (see $log)"
            failed=1
        else
            echo "ok: $t ($case_, $config): $(grep -E '^100%' "$log"); no oclgrind report"
        fi
    done
done
# The mixture's own kernels under tests/oclgrind/mixture.json (the mix's
# items of 4 channels by 3 tokens, the router's passes of 4 logits in
# groups of 4, the fused variant's groups of 8 items over the fewest rows
# it takes), on the group variant: with the three launches
# (ATMOE_MIXTURE_VARIANT=0; oclgrind's device is a GPU, whose default, the
# fused variant, the runs above took at up to 16 tokens) and fused (1).
for variant in 0 1; do
    log=tests/oclgrind-test_moe-mixture$variant.log
    ATMOE_MIXTURE_VARIANT=$variant ATMOE_LINEAR_VARIANT=1 \
        ATMOE_TUNING_SYSTEM_FILE=$srcdir/tests/oclgrind/mixture.json \
        CK_RUN_CASE=oclgrind \
        "$OCLGRIND" --data-races --check-api ./tests/.libs/test_moe \
        > "$log" 2>&1
    reports=$(grep -c -E 'data race|Invalid (read|write)|runtime error|out of bounds|divergence' "$log")
    if ! grep -q -E '^100%: Checks: [0-9]+, Failures: 0, Errors: 0' "$log"; then
        echo "FAIL: test_moe (oclgrind, mixture variant $variant): the suite failed under oclgrind (see $log)"
        failed=1
    elif [ "$reports" -ne 0 ]; then
        echo "FAIL: test_moe (oclgrind, mixture variant $variant): oclgrind reported $reports errors (see $log)"
        failed=1
    else
        echo "ok: test_moe (oclgrind, mixture variant $variant): $(grep -E '^100%' "$log"); no oclgrind report"
    fi
done
exit "$failed"
