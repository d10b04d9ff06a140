#!/bin/sh
# atmoe-tune: a short run at the small size into a fresh database, which
# must then parse and hold one entry for the device; a second run keeps
# the file valid; --check refuses a malformed file; usage errors.  The
# seed is fixed so that repeated runs find the candidates compiled in
# PoCL's kernel cache.  Exit 77 (a skip for automake's harness) when there
# is no OpenCL device.
set -u

tool=./bench/atmoe-tune
atmoe=./tools/atmoe

# shellcheck source=tests/testlib.sh
. "$(dirname "$0")/testlib.sh"
begin tune
skip_without_device "$atmoe" devices

db="$tmp/db/tuning.json"

# --- a short run writes an entry that the library accepts
run --sizes small --budget-s 5 --runs 1 --no-direct --seed 3 --clock cpu \
    --output "$db"
cat "$tmp/out"
if [ "$rc" -ne 0 ]; then
    fail "the tuner exited $rc"
    cat "$tmp/err"
fi
"$tool" --check "$db" > "$tmp/check" 2>&1 || fail "--check refused the tuner's output"
grep -q "with 1 entry" "$tmp/check" || fail "the database does not hold one entry"
grep -q '"atmoe_tuning": 1' "$db" || fail "no format version in the database"
grep -q '"info"' "$db" || fail "no info in the entry"
if command -v python3 > /dev/null 2>&1; then
    python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$db" ||
        fail "python3 cannot parse the database"
fi
ls "$tmp/db" | grep -q '\.json\.' && fail "a temporary file was left behind"

# the entry is the one a context on the device then uses
ATMOE_TUNING_FILE="$db" "$atmoe" params > "$tmp/params" 2>&1 ||
    fail "atmoe params failed"
if grep -q '"Xgemm"' "$db"; then
    grep -q '"device+driver"' "$tmp/params" ||
        fail "a context does not use the saved entry"
fi

# --- --dry-run leaves the file alone
cp "$db" "$tmp/before"
run --sizes small --budget-s 0 --runs 1 --no-direct --seed 3 --clock cpu \
    --output "$db" --dry-run
[ "$rc" -eq 0 ] || fail "a dry run exited $rc"
cmp -s "$db" "$tmp/before" || fail "a dry run changed the database"

# --- --check refuses a malformed file and says why
printf '{"atmoe_tuning": 1, "entries": [{"vendor": "PoCL"}]}\n' > "$tmp/bad.json"
run --check "$tmp/bad.json"
expect 1 "vendor and a type" "--check of a malformed file" err
run --check "$tmp/missing.json"
[ "$rc" -eq 1 ] || fail "--check of a missing file exited $rc, not 1"

# --- a malformed output database is not overwritten
run --sizes small --budget-s 0 --runs 1 --no-direct --seed 3 --clock cpu \
    --output "$tmp/bad.json"
[ "$rc" -eq 1 ] || fail "saving into a malformed database exited $rc, not 1"
grep -q '"vendor": "PoCL"}]}' "$tmp/bad.json" ||
    fail "the malformed database was changed"

# --- usage errors
run --sizes huge
[ "$rc" -eq 2 ] || fail "--sizes huge exited $rc, not 2"
run --runs 0
[ "$rc" -eq 2 ] || fail "--runs 0 exited $rc, not 2"
run --clock sundial
[ "$rc" -eq 2 ] || fail "--clock sundial exited $rc, not 2"
run --no-such-option
[ "$rc" -eq 2 ] || fail "an unknown option exited $rc, not 2"

# --- the linear phases alone (cl/linear.cl's blocks and its boundary with
# CLBlast) write integer SR and ST for the "linear" program, which a
# context on the device then uses
ldb="$tmp/linear/tuning.json"
run --phases linear --sizes small --budget-s 2 --runs 1 --seed 3 --clock cpu \
    --output "$ldb"
cat "$tmp/out"
if [ "$rc" -ne 0 ]; then
    fail "the linear phases exited $rc"
    cat "$tmp/err"
fi
"$tool" --check "$ldb" > /dev/null 2>&1 ||
    fail "--check refused the linear phases' output"
tr -d ' \n' < "$ldb" > "$tmp/flat"
grep -Eq '"kernels":\{"linear":\{[^}]*"SR":[0-9]+[,}]' "$tmp/flat" ||
    fail "no integer SR in the entry's kernels.linear"
grep -Eq '"kernels":\{"linear":\{[^}]*"ST":[0-9]+[,}]' "$tmp/flat" ||
    fail "no integer ST in the entry's kernels.linear"
grep -q '"Xgemm"' "$ldb" && fail "the linear phases wrote CLBlast sets"
ATMOE_TUNING_FILE="$ldb" "$atmoe" params > "$tmp/params" 2>&1 ||
    fail "atmoe params failed on the linear phases' output"
grep -q '"linear"' "$tmp/params" ||
    fail "a context does not use the saved linear macros"
# --- the rows of the GPU variants, named by --phases, run on any device
# (forced: the fused mixture and the tile variant), each candidate checked
# against the reference configuration, and write their parameters
vdb="$tmp/variants/tuning.json"
run --phases mixture.fused,linear.tile --sizes small --budget-s 0 --runs 1 \
    --seed 3 --clock cpu --output "$vdb"
if [ "$rc" -ne 0 ]; then
    fail "the variants' rows exited $rc"
    cat "$tmp/out" "$tmp/err"
fi
grep -q 'WRONG' "$tmp/out" && { fail "a variant's candidate was wrong"; cat "$tmp/out"; }
tr -d ' \n' < "$vdb" > "$tmp/flat"
grep -Eq '"mixture":\{"FUSED_GS":[0-9]+,"FUSED_ROWS":[0-9]+,"FUSED_MAX_TOKENS":[0-9]+\}' \
    "$tmp/flat" || fail "the fused row wrote no FUSED_GS, FUSED_ROWS, FUSED_MAX_TOKENS"
grep -Eq '"TILE_TOKENS":[0-9]+,"TILE_ROWS":[0-9]+,"TILE_K":[0-9]+,"TILE_WT":[0-9]+,"TILE_WR":[0-9]+' \
    "$tmp/flat" || fail "the tile row wrote no tile"

run --phases sgemm
[ "$rc" -eq 2 ] || fail "--phases sgemm exited $rc, not 2"

# --- the blocks for bf16 weights go to "linear.bf16", beside the untyped
# "linear" the run before wrote, which stays as it was
tr -d ' \n' < "$ldb" | grep -o '"linear":{[^}]*}' > "$tmp/untyped"
[ -s "$tmp/untyped" ] || fail "no untyped linear program to keep"
run --dtype bf16 --sizes small --budget-s 2 --runs 1 --seed 3 --clock cpu \
    --output "$ldb"
cat "$tmp/out"
if [ "$rc" -ne 0 ]; then
    fail "the bf16 blocks exited $rc"
    cat "$tmp/err"
fi
"$tool" --check "$ldb" > /dev/null 2>&1 ||
    fail "--check refused the bf16 blocks' output"
tr -d ' \n' < "$ldb" > "$tmp/flat"
grep -Eq '"linear.bf16":\{"SR":[0-9]+,"ST":[0-9]+\}' "$tmp/flat" ||
    fail "no integer SR and ST in the entry's kernels.linear.bf16"
grep -o '"linear":{[^}]*}' "$tmp/flat" | cmp -s - "$tmp/untyped" ||
    fail "the bf16 blocks changed the untyped linear program"
grep -q "weights in bf16 (linear.bf16)" "$tmp/out" ||
    fail "the tuner does not say which weights it tunes for"
run --dtype bf16 --phases clblast
[ "$rc" -eq 2 ] || fail "--dtype bf16 --phases clblast exited $rc, not 2"
run --dtype q8
[ "$rc" -eq 2 ] || fail "--dtype q8 exited $rc, not 2"

# --- --effort: every kernel with parameters, step by step.  The hidden
# effort "test" runs each phase with a budget of 0 (the reference and a
# candidate or two), in seconds.
blocks_of() { # the kernels' blocks of a database, one program a line
    tr -d ' \n' < "$1" | grep -o '"linear[.a-z0-9]*":{"SR":[0-9]*,"ST":[0-9]*' |
        sort
}
edb="$tmp/effort/tuning.json"
run --effort test --seed 3 --output "$edb"
if [ "$rc" -ne 0 ]; then
    fail "--effort test exited $rc"
    cat "$tmp/out" "$tmp/err"
fi
"$tool" --check "$edb" > /dev/null 2>&1 || fail "--check refused --effort's output"
blocks_of "$edb" > "$tmp/effort.blocks"
for prog in linear linear.f16 linear.bf16; do
    grep -q "^\"$prog\":" "$tmp/effort.blocks" ||
        fail "--effort test tuned no blocks for $prog"
done
grep -q '\[11/11\]' "$tmp/out" || fail "--effort shows no step count"
for row in mixture.fused linear.tile; do
    grep -Eq "^$row: (skipped|[A-Z_]+=)" "$tmp/out" ||
        fail "--effort neither tuned nor skipped $row"
done
grep -q 'left' "$tmp/out" || fail "--effort shows no time left"
grep -q 'best so far' "$tmp/out" || fail "--effort shows no best so far"
grep -q '"host"' "$edb" || fail "the entry does not say which host tuned it"
tr -d ' \n' < "$edb" | grep -Eq '"router":\{"WG":[0-9]+,"LPI":[0-9]+\}' ||
    fail "--effort test tuned no router work-group and logits a pass"
tr -d ' \n' < "$edb" |
    grep -Eq '"mixture":\{"WG":[0-9]+,"VW":[0-9]+,"TPI":[0-9]+\}' ||
    fail "--effort test tuned no mixture work-group, vector and tokens"
for prog in kmeans optimizer; do
    tr -d ' \n' < "$edb" | grep -Eq "\"$prog\":\\{\"WG\":[0-9]+\\}" ||
        fail "--effort test tuned no $prog work-group"
done
tr -d ' \n' < "$edb" | grep -Eq '"GROUP_SIZE":[0-9]+,"GROUP_ROWS":[0-9]+' ||
    fail "--effort test tuned no group variant sizes"
[ -e "$edb.progress" ] && fail "a finished search left its checkpoint"
# the entry is used by a new context, and atmoe params says it was tuned
# on this machine
ATMOE_TUNING_FILE="$edb" "$atmoe" params > "$tmp/params" 2>&1 ||
    fail "atmoe params failed on --effort's output"
grep -q '^  linear.f16 .*tuned on this machine' "$tmp/params" ||
    { fail "atmoe params does not say linear.f16 was tuned here"; cat "$tmp/params"; }

# --- an interrupted search resumes after its last checkpoint: the second
# step hangs (a test-only knob), the run is killed once the first step's
# checkpoint is written, and --resume runs the three steps left, keeping
# the first step's result, to the same kernels as the uninterrupted run
rdb="$tmp/resume/tuning.json"
ATMOE_TUNE_TEST_HANG=boundary "$tool" --effort test --seed 3 \
    --output "$rdb" > "$tmp/r1.out" 2>&1 &
pid=$!
i=0
while ! grep -q '"done": 1' "$rdb.progress" 2> /dev/null && [ $i -lt 600 ]; do
    sleep 0.1
    i=$((i + 1))
done
[ -e "$rdb.progress" ] || fail "no checkpoint after the first step"
kill -TERM "$pid"
wait "$pid"
[ -e "$rdb.progress" ] || fail "the killed search left no checkpoint"
first=$(tr -d ' \n' < "$rdb" | grep -o '"linear":{"SR":[0-9]*,"ST":[0-9]*')
[ -n "$first" ] || fail "the first step saved no blocks before the kill"
run --effort test --seed 3 --output "$rdb" --resume
if [ "$rc" -ne 0 ]; then
    fail "--resume exited $rc"
    cat "$tmp/out" "$tmp/err"
fi
grep -q 'resuming the test search at step 2 of 11' "$tmp/out" ||
    { fail "--resume did not resume at step 2"; cat "$tmp/out"; }
grep -q '\[1/11\]' "$tmp/out" && fail "--resume ran the first step again"
tr -d ' \n' < "$rdb" | grep -q -F "$first" ||
    fail "--resume lost the first step's result ($first)"
blocks_of "$rdb" | sed 's/":{.*//' > "$tmp/resumed.progs"
sed 's/":{.*//' "$tmp/effort.blocks" | cmp -s - "$tmp/resumed.progs" ||
    fail "the resumed search tuned other kernels than the uninterrupted one"
grep -q 'MAX_TOKENS\|no MAX_TOKENS' "$tmp/out" ||
    fail "the resumed search did not run the boundary"
[ -e "$rdb.progress" ] && fail "the resumed search left its checkpoint"
# --resume without a checkpoint starts at the beginning
run --effort test --seed 3 --output "$tmp/fresh/tuning.json" --resume
expect 0 "nothing to resume" "--resume without a checkpoint" out

# --- a step that hangs is killed at its time limit and one that crashes
# is skipped; the search goes on to the other steps
hdb="$tmp/hang/tuning.json"
ATMOE_TUNE_TEST_HANG=blocks.f16 ATMOE_TUNE_TEST_CRASH=blocks.bf16 \
    ATMOE_TUNE_STEP_TIMEOUT_S=8 run --effort test --seed 3 --output "$hdb"
[ "$rc" -eq 0 ] || { fail "a search with a hung step exited $rc"; cat "$tmp/err"; }
grep -q 'blocks.f16 skipped: it ran past its limit' "$tmp/err" ||
    { fail "the hung step was not reported skipped"; cat "$tmp/err"; }
grep -q 'blocks.bf16 skipped: it crashed' "$tmp/err" ||
    { fail "the crashed step was not reported skipped"; cat "$tmp/err"; }
blocks_of "$hdb" > "$tmp/hang.blocks"
grep -q '^"linear":' "$tmp/hang.blocks" || fail "the steps before the hang were lost"
grep -q '^"linear.f16":' "$tmp/hang.blocks" && fail "the hung step saved blocks"

# --- a candidate that crashes its process (abort) and one that hangs it
# (test-only knobs) are journalled in the checkpoint, recorded there as
# crashed and timed out, and skipped when their steps run again; the
# search completes and writes a valid database that reports them
cdb="$tmp/cand/tuning.json"
ATMOE_TUNE_TEST_CANDIDATE_CRASH=router:1 ATMOE_TUNE_TEST_CANDIDATE_HANG=kmeans:1 \
    ATMOE_TUNE_CANDIDATE_TIMEOUT_S=6 "$tool" --effort test --seed 3 \
    --output "$cdb" > "$tmp/out" 2> "$tmp/err" &
pid=$!
# the checkpoint as it last was before the finished search removed it
# (each version is written whole: a copy is one of them)
while kill -0 "$pid" 2> /dev/null; do
    cp "$cdb.progress" "$tmp/ckpt.new" 2> /dev/null && mv "$tmp/ckpt.new" "$tmp/ckpt"
    sleep 0.2
done
wait "$pid"
rc=$?
tr -d ' \n' < "$tmp/ckpt" > "$tmp/ckpt.flat" 2> /dev/null
grep -Eq '"step":"0router","candidate":"WG=[0-9]+,LPI=[0-9]+","result":"crashed"' "$tmp/ckpt.flat" ||
    { fail "the checkpoint does not record the crashed candidate"; cat "$tmp/ckpt"; }
grep -Eq '"step":"0kmeans","candidate":"WG=[0-9]+","result":"timedout"' "$tmp/ckpt.flat" ||
    { fail "the checkpoint does not record the hung candidate"; cat "$tmp/ckpt"; }
[ "$rc" -eq 0 ] || { fail "a search with a lost candidate exited $rc"; cat "$tmp/err"; }
grep -q 'router: candidate WG=[0-9]*,LPI=[0-9]* skipped: it crashed' "$tmp/err" ||
    { fail "the crashed candidate was not reported skipped"; cat "$tmp/err"; }
grep -q 'kmeans: candidate WG=[0-9]* skipped: a candidate ran past its limit' \
    "$tmp/err" || { fail "the hung candidate was not reported skipped"; cat "$tmp/err"; }
grep -q 'skipped: it crashed an earlier run of this step' "$tmp/out" ||
    fail "the rerun of the router step did not skip the crashed candidate"
grep -q 'skipped: it timed out an earlier run of this step' "$tmp/out" ||
    fail "the rerun of the kmeans step did not skip the hung candidate"
grep -q 'skipped: .*the entry keeps' "$tmp/err" &&
    fail "a step with a lost candidate was skipped"
"$tool" --check "$cdb" > /dev/null 2>&1 || fail "--check refused the database"
flat=$(tr -d ' \n' < "$cdb")
echo "$flat" | grep -Eq '"lost_candidates":\{[^}]*"router":\[\{"candidate":"WG=[0-9]+,LPI=[0-9]+","result":"crashed"\}\]' ||
    { fail "the entry does not report the crashed candidate"; echo "$flat"; }
echo "$flat" | grep -Eq '"kmeans":\[\{"candidate":"WG=[0-9]+","result":"timedout"\}\]' ||
    fail "the entry does not report the hung candidate"
for prog in router kmeans; do
    echo "$flat" | grep -Eq "\"kernels\":.*\"$prog\":\\{\"WG\":[0-9]+[,}]" ||
        fail "the step with a lost candidate tuned no $prog work-group"
done
[ -e "$cdb.progress" ] && fail "the search left its checkpoint"

# --- usage errors of --effort
run --effort fast
[ "$rc" -eq 2 ] || fail "--effort fast exited $rc, not 2"
run --resume
[ "$rc" -eq 2 ] || fail "--resume without --effort exited $rc, not 2"
run --effort test --phases blocks
[ "$rc" -eq 2 ] || fail "--effort with --phases exited $rc, not 2"
run --effort test --all-devices --device 0
[ "$rc" -eq 2 ] || fail "--all-devices with --device exited $rc, not 2"

# --- tuning at install (build-aux/install-tuning.sh, which make install
# runs): into the installed database beside the shipped entries, used by
# a new context; skipped under a DESTDIR, when configured off and with
# ATMOE_INSTALL_TUNING=0
script="$(dirname "$0")/../build-aux/install-tuning.sh"
idb="$tmp/inst/share/atmoe/tuning.json"
mkdir -p "$tmp/inst/share/atmoe"
cp "$(dirname "$0")/../data/tuning.json" "$idb"
cp "$idb" "$tmp/shipped.json"
sh "$script" "$tmp/destdir" yes "$tool" "$idb" test > "$tmp/out" 2>&1
grep -q 'skipped: installing into DESTDIR' "$tmp/out" || fail "DESTDIR did not skip"
sh "$script" "" no "$tool" "$idb" test > "$tmp/out" 2>&1
grep -q 'skipped: configured with --disable-install-tuning' "$tmp/out" ||
    fail "--disable-install-tuning did not skip"
ATMOE_INSTALL_TUNING=0 sh "$script" "" yes "$tool" "$idb" test > "$tmp/out" 2>&1
grep -q 'skipped: ATMOE_INSTALL_TUNING=0' "$tmp/out" ||
    fail "ATMOE_INSTALL_TUNING=0 did not skip"
cmp -s "$idb" "$tmp/shipped.json" || fail "a skipped install-time tuning changed the database"
sh "$script" "" yes "$tool" "$idb" test > "$tmp/out" 2>&1 ||
    fail "the install-time tuning failed"
"$tool" --check "$idb" > "$tmp/check" 2>&1 || fail "--check refused the installed database"
n_shipped=$(grep -c '"vendor"' "$tmp/shipped.json")
n_now=$(grep -c '"vendor"' "$idb")
[ "$n_now" -gt "$n_shipped" ] ||
    fail "the installed database has no tuned entry beside the shipped ones"
grep -q '"untuned": true' "$idb" || fail "the shipped class defaults were lost"
ATMOE_TUNING_SYSTEM_FILE="$idb" ATMOE_TUNING_FILE= "$atmoe" params \
    > "$tmp/params" 2>&1 || fail "atmoe params failed on the installed database"
grep -q "^  linear .*system database $idb, entry by device+driver: tuned on this machine" \
    "$tmp/params" ||
    { fail "a new context does not use the install-time entry"; cat "$tmp/params"; }

finish atmoe-tune
