#!/bin/sh
# atmoe-bench at the small scale with few repetitions: its outputs (the JSON
# holds every field of the contract, the host figures of a compute in every
# result, the CSV a row per run, the plot is an image), the mor1e and
# train-step workloads, the PyTorch peer, and its errors (unknown or
# unavailable workload, unknown device, unwritable output file, a plot
# without gnuplot, a peer without torch).  Exit 77 (a skip for automake's
# harness) when there is no OpenCL device.  The parts that need gnuplot or
# a Python with torch are skipped, with a message, when they are missing.
set -u

tool=./bench/atmoe-bench
srcdir=${srcdir:-.}
ATMOE_BENCH_DATADIR="$srcdir/bench"
export ATMOE_BENCH_DATADIR

# shellcheck source=tests/testlib.sh
. "$(dirname "$0")/testlib.sh"
begin bench

# run with environment settings first: run_env VAR=VALUE... -- ARGS.
run_env() {
    envs=
    while [ "$1" != "--" ]; do
        envs="$envs $1"
        shift
    done
    shift
    # shellcheck disable=SC2086
    env $envs "$tool" "$@" > "$tmp/out" 2> "$tmp/err"
    rc=$?
}

# ran WHAT ROW: the last run, WHAT, succeeded and its table has a line
# starting ROW for each of atmoe's variants.
ran() {
    if [ "$rc" -ne 0 ]; then
        fail "$1 exited $rc"
        cat "$tmp/err"
    fi
    cat "$tmp/out"
    for v in fused unfused merged; do
        grep -q "^$2 $v " "$tmp/out" || fail "$1: the table has no $v row"
    done
}

# What the optional parts need.
if [ -n "${ATMOE_BENCH_GNUPLOT:-}" ] || command -v gnuplot > /dev/null 2>&1
then
    have_gnuplot=1
else
    have_gnuplot=0
    echo "SKIP (part): no gnuplot, --plot is only checked for its errors"
fi
python=${ATMOE_BENCH_PYTHON:-/usr/bin/python3}
have_torch=0
if [ -x "$python" ] &&
    "$python" -c 'import importlib.util as u, sys
sys.exit(not (u.find_spec("torch") and u.find_spec("numpy")))' 2> /dev/null
then
    have_torch=1
else
    echo "SKIP (part): $python has no torch, --peer torch is only checked" \
        "for its errors"
fi

skip_without_device "$tool" --list-devices

# --- a run, its JSON, its CSV and its plot
plot=
[ "$have_gnuplot" -eq 1 ] && plot="--plot=$tmp/out.png"
# shellcheck disable=SC2086
run --scale small --reps 2 --warmup 1 --workload decode \
    --json "$tmp/out.json" --csv "$tmp/out.csv" $plot
ran "the decode run (T=1)" "decode  *small  *1"

"$tool" --check-json "$tmp/out.json" || fail "--check-json rejected the JSON"
for f in '"device"' '"name"' '"vendor"' '"type"' '"ceilings"' \
    '"read_gbs"' '"gflops"' '"launch_us"' '"results"' '"workload"' \
    '"scale"' '"variant"' '"params"' '"T"' '"d_in"' '"d_out"' \
    '"experts"' '"rank"' '"median_ms"' '"min_ms"' '"max_ms"' '"gbs"' \
    '"roofline"'; do
    grep -q "$f:" "$tmp/out.json" || fail "the JSON has no field $f"
done
# decode runs T = 1, 4 and 16, each in three variants
n=$(grep -c '"workload": "decode"' "$tmp/out.json")
[ "$n" -eq 9 ] || fail "the JSON holds $n decode results, not 9"
# has_host_fields FILE: every result of FILE holds the library's host
# figures; sets n to the count of results.
has_host_fields() {
    n=$(grep -c '"workload":' "$1")
    for f in host_ms_median host_allocations_max; do
        k=$(grep -c "\"$f\":" "$1")
        [ "$k" -eq "$n" ] || fail "$k of the $n results of $1 hold $f"
    done
}
has_host_fields "$tmp/out.json"
# A count, whatever it is: the library's computes are being made free of
# allocations, so its value is not asserted here.
k=$(grep -c '"host_allocations_max": [0-9][0-9]*,\{0,1\}$' "$tmp/out.json")
[ "$k" -eq "$n" ] ||
    fail "$k of $n results have a number as host_allocations_max"
grep -q ' host ms  *allocs ' "$tmp/out" ||
    fail "the table has no host ms and allocs columns"
if command -v python3 > /dev/null 2>&1; then
    python3 -c 'import json, sys; json.load(open(sys.argv[1]))' \
        "$tmp/out.json" || fail "python3 cannot parse the JSON"
fi

head -n 1 "$tmp/out.csv" | grep -q '^device,vendor,type,workload,scale,variant,params,T,d_in,d_out,experts,rank,' ||
    fail "the CSV header is wrong"
head -n 1 "$tmp/out.csv" | grep -q ',host_ms_median,host_allocations_max$' ||
    fail "the CSV header has no host figures"
n=$(grep -c ',decode,small,' "$tmp/out.csv")
[ "$n" -eq 9 ] || fail "the CSV holds $n decode rows, not 9"
ls "$tmp" | grep -q '\.tmp-' && fail "a temporary output file was left behind"
if grep -q '(PoCL ' "$tmp/out"; then
    grep -q 'POCL_AFFINITY' "$tmp/out" ||
        fail "the report does not say how PoCL places its threads"
    grep -q '"pocl_affinity":' "$tmp/out.json" ||
        fail "the JSON has no pocl_affinity for a PoCL device"
fi
if [ "$have_gnuplot" -eq 1 ]; then
    [ "$(od -An -c -N4 "$tmp/out.png" | tr -d ' ')" = '211PNG' ] ||
        fail "--plot did not write a PNG image"
fi

# --- mor1e and, with torch, the PyTorch peer; an SVG plot
peer=
[ "$have_torch" -eq 1 ] && peer="--peer=torch"
plot=
[ "$have_gnuplot" -eq 1 ] && plot="--plot=$tmp/peer.svg"
# shellcheck disable=SC2086
run --scale small --reps 1 --warmup 0 --workload decode,mor1e \
    --json "$tmp/peer.json" $peer $plot
ran "the mor1e${peer:+ and peer} run" "mor1e  *small  *512"
"$tool" --check-json "$tmp/peer.json" || fail "--check-json rejected the JSON"
grep -q '"r2": 8' "$tmp/peer.json" || fail "the mor1e results have no r2"
has_host_fields "$tmp/peer.json"
if [ "$have_torch" -eq 1 ]; then
    for T in 1 4 16; do
        grep -q "^decode  *small  *$T torch " "$tmp/out" ||
            fail "the table has no decode T=$T torch row"
    done
    for T in 1 16 512; do
        grep -q "^mor1e  *small  *$T torch " "$tmp/out" ||
            fail "the table has no mor1e T=$T torch row"
    done
    n=$(grep -c '"variant": "torch"' "$tmp/peer.json")
    [ "$n" -eq 6 ] || fail "the JSON holds $n torch results, not 6"
    n=$(grep -c '"host_allocations_max": null' "$tmp/peer.json")
    [ "$n" -eq 6 ] ||
        fail "$n results, not the 6 torch ones, have no host figures"
    grep -q '"peer": {' "$tmp/peer.json" || fail "the JSON has no peer"
fi
if [ "$have_gnuplot" -eq 1 ]; then
    grep -q '<svg' "$tmp/peer.svg" || fail "--plot did not write an SVG image"
fi
ls "$tmp" | grep -q '\.tmp-' && fail "a temporary output file was left behind"

# --- train-step: fused and unfused (and torch) training steps, no merged
# row, each checked against the fused first forward, tokens per second
# shellcheck disable=SC2086
run --scale small --reps 1 --warmup 0 --workload train-step \
    --json "$tmp/train.json" $peer
[ "$rc" -eq 0 ] || { fail "the train-step run exited $rc"; cat "$tmp/err"; }
cat "$tmp/out"
for v in fused unfused; do
    grep -q "^train-step  *small  *64 $v " "$tmp/out" ||
        fail "the table has no train-step $v row"
done
grep -q "^train-step  *small  *64 merged " "$tmp/out" &&
    fail "train-step has a merged row"
grep -q "^  unfused T=64 d=512: .* tokens/s" "$tmp/out" ||
    fail "the report has no tokens per second for train-step"
"$tool" --check-json "$tmp/train.json" || fail "--check-json rejected the JSON"
n=$(grep -c '"tokens_per_s":' "$tmp/train.json")
want=2
[ "$have_torch" -eq 1 ] && want=3
[ "$n" -eq "$want" ] || fail "$n train-step results have tokens_per_s, not $want"
if [ "$have_torch" -eq 1 ]; then
    grep -q "^train-step  *small  *64 torch " "$tmp/out" ||
        fail "the table has no train-step torch row"
fi

# --- the recipes' step loops (small: T = 64, d = 512, one timed step a
# model): a fused (the library) row each, and with torch a torch row with
# its ratio, tokens per second in the report and the JSON
# shellcheck disable=SC2086
run --scale small --reps 1 --warmup 0 \
    --workload recipe-stage1,recipe-stage2,recipe-trex \
    --json "$tmp/recipes.json" $peer
[ "$rc" -eq 0 ] || { fail "the recipes' run exited $rc"; cat "$tmp/err"; }
cat "$tmp/out"
want=1
[ "$have_torch" -eq 1 ] && want=2
for w in stage1 stage2 trex; do
    grep -q "^recipe-$w *small  *64 fused " "$tmp/out" ||
        fail "the table has no recipe-$w fused row"
    grep -q "^  recipe-$w *fused  *T=64 d=512: .* tokens/s" "$tmp/out" ||
        fail "the report has no tokens per second for recipe-$w"
    n=$(grep -c "\"workload\": \"recipe-$w\"" "$tmp/recipes.json")
    [ "$n" -eq "$want" ] || fail "the JSON holds $n recipe-$w results, not $want"
    if [ "$have_torch" -eq 1 ]; then
        grep -q "^  recipe-$w *torch  *T=64 d=512: .* tokens/s, torch / atmoe [0-9.]*x" \
            "$tmp/out" || fail "the report has no torch ratio for recipe-$w"
    fi
done
n=$(grep -c '"tokens_per_s":' "$tmp/recipes.json")
[ "$n" -eq $((3 * want)) ] ||
    fail "$n recipe results have tokens_per_s, not $((3 * want))"
"$tool" --check-json "$tmp/recipes.json" ||
    fail "--check-json rejected the recipes' JSON"

# --check-json refuses a file without the contract
echo '{"device": {}}' > "$tmp/bad.json"
run --check-json "$tmp/bad.json"
[ "$rc" -ne 0 ] || fail "--check-json accepted a file without the contract"

# --- errors
run --workload no-such-workload
expect 2 "unknown workload 'no-such-workload'" "an unknown workload" err
run --workload decode --plot "$tmp/plot.txt"
expect 2 "FILE.svg or FILE.png" "--plot to a .txt" err

run_env ATMOE_BENCH_GNUPLOT="$tmp/no-gnuplot" -- --workload decode \
    --plot "$tmp/none.png"
expect 1 "no-gnuplot" "--plot without gnuplot" err
[ -e "$tmp/none.png" ] && fail "--plot without gnuplot left a file"

run --workload decode --peer tensorflow
[ "$rc" -eq 2 ] || fail "--peer tensorflow exited $rc, not 2"

# --- parameters: the run's choice is in every result
run --workload decode --reps 1 --warmup 0 --params default \
    --json "$tmp/default.json"
[ "$rc" -eq 0 ] || fail "--params default exited $rc"
n=$(grep -c '"params": "default"' "$tmp/default.json")
[ "$n" -eq 9 ] || fail "$n of 9 results say params default"
grep -q '"params": "default"' "$tmp/out.json" &&
    fail "a run without --params labels its results default"
run --workload decode --params fast
[ "$rc" -eq 2 ] || fail "--params fast exited $rc, not 2"

# --- W0 in bf16: named in the header, every check within its tolerance
# (the variants share the rounded weights), W0 counted at 2 bytes
run --workload decode --reps 1 --warmup 0 --dtype bf16 \
    --json "$tmp/bf16.json"
[ "$rc" -eq 0 ] || fail "--dtype bf16 exited $rc"
grep -q 'W0 stored as: bf16' "$tmp/out" || fail "the header does not name bf16"
b32=$(grep -o '"bytes": [0-9.e+]*' "$tmp/default.json" | head -n 1 | cut -d' ' -f2)
b16=$(grep -o '"bytes": [0-9.e+]*' "$tmp/bf16.json" | head -n 1 | cut -d' ' -f2)
awk -v a="$b32" -v b="$b16" 'BEGIN { exit !(b < a * 0.7) }' ||
    fail "bf16 W0 counted $b16 bytes, f32 $b32"
# --- W0 in 8-bit blocks: named with its memory, counted at 36 bytes a
# block of 32 (d = 1024: 1.125 MiB, against 4 MiB in f32)
run --workload decode --reps 1 --warmup 0 --dtype q8 --json "$tmp/q8.json"
[ "$rc" -eq 0 ] || fail "--dtype q8 exited $rc"
grep -q 'W0 stored as: q8 (fused and merged variants): 1.1 MiB a d = 1024 layer, f32 4.0 MiB' "$tmp/out" ||
    fail "the header does not name q8 with its memory"
b8=$(grep -o '"bytes": [0-9.e+]*' "$tmp/q8.json" | head -n 1 | cut -d' ' -f2)
# W0 alone differs: 2 bytes a weight against 36 a block of 32.
awk -v a="$b16" -v b="$b8" \
    'BEGIN { exit !(a - b == 1024 * 1024 * 2 - 1024 * 32 * 36) }' ||
    fail "q8 W0 counted $b8 bytes, bf16 $b16"
run --workload decode --dtype q4
[ "$rc" -eq 2 ] || fail "--dtype q4 exited $rc, not 2"

run_env ATMOE_BENCH_PYTHON="$tmp/no-python" -- --workload decode --peer torch
expect 1 "no-python" "--peer torch without its Python" err

# A Python without its site packages stands for one without torch.
if [ -x "$python" ]; then
    printf '#!/bin/sh\nexec "%s" -S "$@"\n' "$python" > "$tmp/python-bare"
    chmod +x "$tmp/python-bare"
    run_env ATMOE_BENCH_PYTHON="$tmp/python-bare" -- --workload decode \
        --peer torch
    expect 1 "cannot import torch" "--peer torch without torch" err
fi

run --device no-such-device-xyz --workload decode
[ "$rc" -eq 1 ] || [ "$rc" -eq 2 ] ||
    fail "an unknown device exited $rc, not 1 or 2"
grep -q "no-such-device-xyz" "$tmp/err" ||
    fail "no message naming the unknown device"

run --workload decode --json "$tmp/missing/out.json"
[ "$rc" -ne 0 ] || fail "an unwritable --json path exited 0"
grep -q "missing/out.json" "$tmp/err" ||
    fail "no message naming the unwritable --json path"

run --workload decode --csv "$tmp"
[ "$rc" -ne 0 ] || fail "a directory as --csv exited 0"
grep -q "is a directory" "$tmp/err" ||
    fail "no message for a directory as --csv"

run --reps 0
[ "$rc" -eq 2 ] || fail "--reps 0 exited $rc, not 2"

finish atmoe-bench
