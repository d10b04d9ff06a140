#!/bin/sh
# The mixture suites again with the fused small-batch variant forced
# (ATMOE_MIXTURE_VARIANT=1: cl/mixture.cl's mixture_fused for batches of up
# to kernels.mixture.FUSED_MAX_TOKENS tokens, the default on GPUs), so that
# a CPU device checks it against the float64 references of the mixture
# cases of tests/test_moe (every batch of 1 to 19 tokens, the three
# mixes, gate rows per token, per sequence and for all)
# and of tests/test_moe_layer.  Exit 77 (a skip) when there is no OpenCL
# device, as theirs.
set -u
ATMOE_MIXTURE_VARIANT=1
export ATMOE_MIXTURE_VARIANT
status=0
# (The typed case, every storage type again, is left to a run by hand:
# CK_RUN_CASE=typed; it doubled this script's time on 2 cores.)
for t in ./tests/test_moe:mixture ./tests/test_moe_layer:; do
    prog=${t%%:*}
    case_=${t#*:}
    echo "$prog ${case_:+(case $case_) }with ATMOE_MIXTURE_VARIANT=1"
    # An empty CK_RUN_CASE would run no case: unset, it runs them all.
    (if [ -n "$case_" ]; then CK_RUN_CASE=$case_; export CK_RUN_CASE;
     else unset CK_RUN_CASE; fi; exec "$prog")
    rc=$?
    if [ "$rc" -eq 77 ]; then
        [ "$status" -eq 0 ] && status=77
    elif [ "$rc" -ne 0 ]; then
        echo "FAIL: $prog with the fused variant exited $rc"
        status=1
    fi
done
exit "$status"
