#!/bin/sh
# atmoe inspect and atmoe run on the fixtures of
# tests/fixtures/make_adapters.py: what they print, their exit statuses
# (atmoe(1): 0 success, 1 failure or problems found, 2 usage), the outputs
# and router trace of run against the float64 reference (through
# tests/compare_outputs, tolerance 1e-5 of max(1, max |want|) per tensor,
# as tests/test_manifest.c derives it), and their errors: a missing file, a
# malformed manifest, an input without x, an unwritable output, usage
# mistakes.  No failed run may leave an output or a temporary file behind.
# Exit 77 (a skip for automake's harness) when there is no OpenCL device.
set -u

tool=./tools/atmoe
compare=./tests/compare_outputs
srcdir=${srcdir:-.}
# Absolute, as the manifests written below name files by it.
fx=$(cd "$srcdir/tests/fixtures" && pwd) || exit 99
m="$fx/manifest"

# shellcheck source=tests/testlib.sh
. "$(dirname "$0")/testlib.sh"
begin cli

# --- inspect needs no device
run inspect "$fx/peft/code"
expect 0 "model.layers.1.self_attn.q_proj" "inspect of an adapter"
grep -q "^  *1  model.layers.1.self_attn.q_proj  *2  *13  *13  *16  *8$" \
    "$tmp/out" || fail "inspect does not list q_proj of layer 1 with rank 2, scale 8"
grep -q "0 problem(s)" "$tmp/out" || fail "inspect found problems in a good adapter"
run inspect "$fx/peft/gpt2/adapter_config.json"
expect 0 "fan_in_fan_out true" "inspect of an adapter by its config"
run inspect "$fx/peft-bad/dora"
expect 1 "DoRA" "inspect of a DoRA adapter"
run inspect "$fx/peft-bad/embedding"
expect 1 "embedding" "inspect of an embedding adapter"
run inspect "$fx/peft-nan"
expect 1 "1 non-finite value(s) in lora_B" "inspect of an adapter with a NaN"
run inspect "$m/base.safetensors"
expect 0 "transformer.h.0.attn.c_attn.weight" "inspect of a safetensors file"
grep -q "BF16  *\[13, 13\]" "$tmp/out" || fail "inspect does not show a BF16 [13, 13] tensor"
run inspect "$m/manifest.json"
expect 0 "3 layer(s), 5 module(s), 13 -> 10 features" "inspect of the manifest"
grep -q "general (lambda 0.75)" "$tmp/out" || fail "inspect does not show the general LoRA"
grep -q "scale 3 (rsLoRA)" "$tmp/out" || fail "inspect does not show rsLoRA scales"
grep -q "q_proj.weight in .*base.safetensors, BF16 as bf16$" "$tmp/out" ||
    fail "inspect does not show a BF16 weight kept as bf16"
grep -q "v_proj.weight in .*base.safetensors, F16 as f16$" "$tmp/out" ||
    fail "inspect does not show an F16 weight kept as f16"
grep -q "^  device memory of the weights: 9784 bytes" "$tmp/out" ||
    fail "inspect does not show the device memory of the manifest"
# A base weight asked in 8-bit blocks: shown so, its memory in whole
# blocks (13 rows of one 36-byte block for [13, 13]: 468 bytes of the
# 1252, where f32 would take 676).
cat > "$tmp/q8.json" <<JSON
{"version": 1, "weights": "$m/base.safetensors", "layers": [{"modules": {
  "q_proj": {"weight": {"tensor": "model.layers.0.self_attn.q_proj.weight",
                        "dtype": "q8"},
             "groups": [["$fx/peft/math"]]}}}]}
JSON
run inspect "$tmp/q8.json"
expect 0 "1 layer(s), 1 module(s)" "inspect of a manifest with a q8 weight"
grep -q "q_proj.weight in .*base.safetensors, F32 as q8$" "$tmp/out" ||
    fail "inspect does not show an F32 weight held as q8"
grep -q "^  device memory of the weights: 1252 bytes" "$tmp/out" ||
    fail "inspect does not count the q8 weight's blocks"
run inspect "$tmp/missing"
expect 1 "missing" "inspect of a missing file"
run inspect
expect 2 "usage" "inspect without a path"

# A manifest whose files do not fit is described, with the problem.
cat > "$tmp/misfit.json" <<JSON
{"version": 1, "weights": "$m/base.safetensors", "layers": [{"modules": {
  "q_proj": {"weight": "model.layers.0.self_attn.q_proj.weight",
             "groups": [["$fx/peft/math"], ["$fx/peft/missing"]]}}}]}
JSON
run inspect "$tmp/misfit.json"
expect 1 "problem: NOT_FOUND: layers[0].modules.q_proj.groups[1][0]" \
    "inspect of a manifest naming a missing adapter"
printf '{"version": 1, "layers": [{"modules": {"q": {"weight": 3}}}]}' \
    > "$tmp/bad.json"
run inspect "$tmp/bad.json"
expect 1 "layers[0].modules.q.weight" "inspect of a malformed manifest"

# --- run
skip_without_device "$tool" devices

run run "$m/manifest.json" --input "$m/x.safetensors" \
    --output "$tmp/y.safetensors" --trace "$tmp/trace.safetensors"
expect 0 "ran 3 layer(s), 5 module(s) on 5 token(s)" "run"
"$compare" "$m/expected.safetensors" 1e-5 "$tmp/y.safetensors" \
    "$tmp/trace.safetensors" || fail "run's outputs differ from the reference"
run inspect "$tmp/y.safetensors"
expect 0 "layers.1.v_proj" "inspect of run's output"

run run "$m/manifest.json" --input="$m/x-seq.safetensors" \
    --output="$tmp/y-seq.safetensors" --trace "$tmp/trace-seq.safetensors"
expect 0 "on 6 token(s)" "run with one router row per sequence"
"$compare" "$m/expected-seq.safetensors" 1e-5 "$tmp/y-seq.safetensors" \
    "$tmp/trace-seq.safetensors" ||
    fail "run's per-sequence outputs differ from the reference"

# Rank-1 experts (tests/fixtures/make_mor1e.py): scored from the input's
# embeddings against the manifest's centroids, traced.
r1="$fx/mor1e"
run run "$r1/manifest.json" --input "$r1/x.safetensors" \
    --output "$tmp/y-r1.safetensors" --trace "$tmp/trace-r1.safetensors"
expect 0 "ran 2 layer(s), 2 module(s) on 5 token(s)" "run of rank-1 experts"
"$compare" "$r1/expected.safetensors" 1e-5 "$tmp/y-r1.safetensors" \
    "$tmp/trace-r1.safetensors" ||
    fail "run's rank-1 outputs and traces differ from the reference"
run inspect "$r1/manifest.json"
expect 0 "rank-1 experts v2 (r1 2, r2 3, 6 experts)" "inspect of rank-1 modules"
run run "$r1/manifest.json" --input "$m/x.safetensors" \
    --output "$tmp/y-r1b.safetensors"
expect 1 "uses the intuition" "run of rank-1 experts without embeddings"
[ -e "$tmp/y-r1b.safetensors" ] && fail "a failed rank-1 run wrote its output"

# Without --trace only the outputs are written.  The temporary a killed
# run left (its process gone: no pid is above the kernel's pid_max) goes;
# one whose writer lives stays.
echo stale > "$tmp/y2.safetensors.tmp-99999999"
echo live > "$tmp/y2.safetensors.tmp-$$"
run run "$m/manifest.json" --input "$m/x.safetensors" --output "$tmp/y2.safetensors"
expect 0 "wrote $tmp/y2.safetensors" "run without a trace"
[ -e "$tmp/y2.safetensors.tmp-99999999" ] &&
    fail "a killed run's temporary file was left"
[ -e "$tmp/y2.safetensors.tmp-$$" ] ||
    fail "a live run's temporary file was removed"
rm -f "$tmp/y2.safetensors.tmp-$$"
cmp -s "$tmp/y.safetensors" "$tmp/y2.safetensors" ||
    fail "the same run wrote different outputs"

# --- run's errors; none leaves a file
rm -f "$tmp/out.safetensors"
run run "$tmp/missing.json" --input "$m/x.safetensors" --output "$tmp/out.safetensors"
expect 1 "missing.json" "run of a missing manifest"
run run "$tmp/bad.json" --input "$m/x.safetensors" --output "$tmp/out.safetensors"
expect 1 "layers[0].modules.q.weight" "run of a malformed manifest"
run run "$m/manifest.json" --input "$tmp/missing.safetensors" --output "$tmp/out.safetensors"
expect 1 "missing.safetensors" "run of a missing input"
run run "$m/manifest.json" --input "$m/router.safetensors" --output "$tmp/out.safetensors"
expect 1 "x" "run of an input without x"
run run "$m/manifest.json" --input "$m/base.safetensors" --output "$tmp/out.safetensors"
expect 1 "no tensor" "run of an input without x"
[ -e "$tmp/out.safetensors" ] && fail "a failed run wrote its output"
run run "$m/manifest.json" --input "$m/x.safetensors" --output "$tmp/no/dir/y.safetensors"
expect 1 "no/dir/y.safetensors" "run to an unwritable output"
run run "$m/manifest.json" --input "$m/x.safetensors" --output "$tmp/y3.safetensors" \
    --trace "$tmp/no/dir/t.safetensors"
expect 1 "no/dir/t.safetensors" "run to an unwritable trace"
[ -e "$tmp/y3.safetensors" ] && fail "a run whose trace failed wrote its output"
run run "$m/manifest.json" --input "$m/x.safetensors" --output "$tmp/y3.safetensors" \
    --device no-such-device-xyz
expect 1 "no-such-device-xyz" "run on an unknown device"
[ -e "$tmp/y3.safetensors" ] && [ "$rc" -ne 0 ] && fail "a failed run wrote its output"
run run "$m/manifest.json" --input "$m/x.safetensors"
expect 2 "usage" "run without --output"
run run "$m/manifest.json" --input "$m/x.safetensors" --output "$tmp/y4.safetensors" --frobnicate
expect 2 "--frobnicate" "run with an unknown option"
run run "$m/manifest.json" --input
expect 2 "--input needs a value" "run with a missing value"
run run a.json b.json --input "$m/x.safetensors" --output "$tmp/y4.safetensors"
expect 2 "b.json" "run with two manifests"
ls -a "$tmp" | grep -q '\.safetensors\.' && fail "a temporary output file was left behind"

run frobnicate
expect 2 "unknown command 'frobnicate'" "an unknown command"
run --help
expect 0 "inspect" "the help"

finish "atmoe inspect and run"
