#!/bin/sh
# The mixture suites again with the linear route's other variants forced,
# so that a CPU device checks each over every route, batch and storage type
# that the suites cover against their float64 references:
#   - the group variant (ATMOE_LINEAR_VARIANT=1: cl/linear_gpu.cl, the
#     default on GPUs) over tests/test_moe, test_moe_layer and test_mor1e;
#   - the tile variant from 2 tokens (ATMOE_LINEAR_TILE_MIN_TOKENS=2:
#     cl/linear_tile.cl, the default for prefill on GPUs) on its default
#     tile over those (test_moe's every storage type of W, q8 included)
#     and test_moe_backward (whose products take the same route); single
#     tokens stay on the CPU-shaped variant, so a graph planned for a
#     batch also switches kernels between its runs;
#   - the tile variant on an odd tile (tests/oclgrind/tuning.json as the
#     user database: 6 tokens x 9 rows, k by 5, 2 x 3 a work-item), so
#     that the suites' shapes span several tiles with partial ones at every
#     edge, over test_moe and test_mor1e;
#   - the CPU-shaped variant's two vector widths (tests/linear/vw8.json
#     and vw16.json as the user database: float8, 4 x 3 tiles, as on AVX2;
#     float16, 4 x 4, as on AVX-512), whichever the device's native one
#     is, over test_moe.
# Exit 77 (a skip) when there is no OpenCL device, as theirs.
set -u
srcdir=${srcdir:-.}
odd="ATMOE_TUNING_FILE=$srcdir/tests/oclgrind/tuning.json"
status=0
run() {
    force=$1
    shift
    for t in "$@"; do
        echo "$t with $force"
        env $force "$t"
        rc=$?
        if [ "$rc" -eq 77 ]; then
            [ "$status" -eq 0 ] && status=77
        elif [ "$rc" -ne 0 ]; then
            echo "FAIL: $t with $force exited $rc"
            status=1
        fi
    done
}
run ATMOE_LINEAR_VARIANT=1 ./tests/test_moe ./tests/test_moe_layer \
    ./tests/test_mor1e
run ATMOE_LINEAR_TILE_MIN_TOKENS=2 ./tests/test_moe ./tests/test_moe_layer \
    ./tests/test_mor1e ./tests/test_moe_backward
run "ATMOE_LINEAR_TILE_MIN_TOKENS=2 $odd" ./tests/test_moe ./tests/test_mor1e
for w in 8 16; do
    run "ATMOE_TUNING_FILE=$srcdir/tests/linear/vw$w.json" ./tests/test_moe
done
exit "$status"
