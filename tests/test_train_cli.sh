#!/bin/sh
# atmoe train: stage 1 and stage 2 on the toy stack of tests/fixtures
# (adapters written, a JSON log, a manifest that atmoe run applies), stage
# 2 on labels over a head (atmoe run's logits give its cross-entropy), bad
# data refused with a message and no output, and the demonstration at a
# small size meeting its targets: the routed mixture within 1.5x of the
# per-task experts' held-out loss and at most 0.7x the single LoRA's.
# T-REX from instruction embeddings through atmoe cluster to atmoe run
# (the trainer's loss is atmoe run's), and a run that does not train (lr
# 0.1 closes its gate) failing with the gate named.
# Inputs are written and outputs read by python3's standard library
# (skipped without it); exit 77 (a skip) when there is no OpenCL device.
set -u

tool=./tools/atmoe

# shellcheck source=tests/testlib.sh
. "$(dirname "$0")/testlib.sh"
begin train
skip_without_device "$tool" devices
if ! command -v python3 > /dev/null 2>&1; then
    echo "SKIP: no python3 to write the inputs"
    exit 77
fi
fixture="${srcdir:-.}/tests/fixtures/manifest/manifest.json"

# data OUT D_IN [task ROW VALUE | nan ROW COL]: x [40, D_IN], y [40, 10],
# task [40] (i32, 0..3) as safetensors.
data() {
    python3 - "$@" <<'PY'
import json, random, struct, sys
out, d_in = sys.argv[1], int(sys.argv[2])
n, d_out = 40, 10
rnd = random.Random(3)
x = [[rnd.uniform(-1, 1) for _ in range(d_in)] for _ in range(n)]
y = [[rnd.uniform(-1, 1) for _ in range(d_out)] for _ in range(n)]
task = [i % 4 for i in range(n)]
if len(sys.argv) > 3 and sys.argv[3] == "task":
    task[int(sys.argv[4])] = int(sys.argv[5])
if len(sys.argv) > 3 and sys.argv[3] == "nan":
    x[int(sys.argv[4])][int(sys.argv[5])] = float("nan")
blobs, header, off = [], {}, 0
for name, dtype, shape, fmt, flat in (
        ("x", "F32", [n, d_in], "f", [v for r in x for v in r]),
        ("y", "F32", [n, d_out], "f", [v for r in y for v in r]),
        ("task", "I32", [n], "i", task)):
    b = struct.pack("<%d%s" % (len(flat), fmt), *flat)
    header[name] = {"dtype": dtype, "shape": shape,
                    "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
with open(out, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
PY
}

data "$tmp/d.safetensors" 13 || exit 99
run train stage1 "$fixture" --data "$tmp/d.safetensors" \
    --output "$tmp/s1" --steps 5 --batch 7 --lr 1e-2 --log "$tmp/log.json"
expect 0 "experts trained" "stage1"
for a in math code style general gpt2; do
    [ -f "$tmp/s1/$a/adapter_config.json" ] &&
        [ -f "$tmp/s1/$a/adapter_model.safetensors" ] ||
        fail "stage1 wrote no adapter $a"
done
done_lines=$(grep -c '"done": true' "$tmp/log.json")
[ "$done_lines" -eq 5 ] || fail "the log holds $done_lines done lines, not 5"
steps=$(grep -c '"done": false' "$tmp/log.json")
[ "$steps" -eq 25 ] || fail "the log holds $steps steps, not 25"

run train stage2 "$fixture" --data "$tmp/d.safetensors" \
    --output "$tmp/s2" --steps 5 --batch 8 --lr 1e-2
expect 0 "routers trained" "stage2"
run run "$tmp/s2/manifest.json" --input "$tmp/d.safetensors" \
    --output "$tmp/y.safetensors"
expect 0 "" "atmoe run of the stage-2 manifest"

# Classification: the stage-2 manifest above with a head W [4, 10] (F16)
# and its bias, labels [40] (every fifth row ignored) instead of y; stage 2
# trains on them, and atmoe run's logits of the written manifest give the
# cross-entropy the trainer printed.  The labels are random: full batches
# (40 rows), so that the training loss falls (a run that did not lower it
# fails).
python3 - "$tmp/s2/manifest.json" "$tmp" <<'PY' || exit 99
import json, random, struct, sys
src, tmp = sys.argv[1], sys.argv[2]
rnd = random.Random(5)
n, d_in, d_out, classes = 40, 13, 10, 4
def save(path, tensors):
    blobs, header, off = [], {}, 0
    for name, dtype, shape, fmt, flat in tensors:
        b = struct.pack("<%d%s" % (len(flat), fmt), *flat)
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
w = [rnd.uniform(-1, 1) for _ in range(classes * d_out)]
save(tmp + "/head.safetensors",
     [("w", "F16", [classes, d_out], "e", w),
      ("b", "F32", [classes], "f", [rnd.uniform(-0.2, 0.2)
                                    for _ in range(classes)])])
x = [rnd.uniform(-1, 1) for _ in range(n * d_in)]
labels = [-100 if i % 5 == 2 else rnd.randrange(classes) for i in range(n)]
save(tmp + "/labels.safetensors",
     [("x", "F32", [n, d_in], "f", x), ("labels", "I32", [n], "i", labels)])
m = json.load(open(src))
m["head"] = {"file": tmp + "/head.safetensors", "tensor": "w",
             "bias": {"file": tmp + "/head.safetensors", "tensor": "b"}}
# Beside the manifest: its router file is named relative to it.
json.dump(m, open(tmp + "/s2/head.json", "w"))
PY
run train stage2 "$tmp/s2/head.json" --data "$tmp/labels.safetensors" \
    --output "$tmp/c2" --steps 20 --batch 40 --lr 1e-2
expect 0 "routers trained: cross-entropy" "stage2 on labels"
trained=$(sed -n 's/.*cross-entropy \([^ ]*\) over.*/\1/p' "$tmp/out")
run run "$tmp/c2/manifest.json" --input "$tmp/labels.safetensors" \
    --output "$tmp/logits.safetensors"
expect 0 "" "atmoe run of the classification manifest"
run inspect "$tmp/c2/manifest.json"
expect 0 ": 4 classes, ignore index -100" "atmoe inspect of the head" out
if ! python3 - "$tmp/logits.safetensors" "$tmp/labels.safetensors" \
    "$trained" <<'PY'
import json, math, struct, sys
def load(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header, out = json.loads(raw[8:8 + n]), {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        fmt = {"F32": "f", "I32": "i"}[t["dtype"]]
        out[name] = (t["shape"], struct.unpack(
            "<%d%s" % ((b - a) // 4, fmt), raw[8 + n + a:8 + n + b]))
    return out
shape, z = load(sys.argv[1])["logits"]
labels = load(sys.argv[2])["labels"][1]
rows, classes = shape
total, count = 0.0, 0
for r in range(rows):
    if labels[r] == -100:
        continue
    row = z[r * classes:(r + 1) * classes]
    m = max(row)
    total += m + math.log(sum(math.exp(v - m) for v in row)) - row[labels[r]]
    count += 1
ce, trained = total / count, float(sys.argv[3])
print("cross-entropy of atmoe run's logits %.7g, the trainer's %.7g" %
      (ce, trained))
sys.exit(0 if rows == 40 and classes == 4 and
         abs(ce - trained) <= 1e-4 * ce else 1)
PY
then
    fail "atmoe run's logits do not give the trainer's cross-entropy"
fi
run train stage2 "$fixture" --data "$tmp/labels.safetensors" \
    --output "$tmp/b1"
expect 1 "the manifest has no \"head\"" "stage2 on labels without a head" err

# Resumed from a checkpoint: the same adapters as a run not interrupted
# (the one above ran 5 steps; this one 3, then 2 more from its checkpoints).
run train stage1 "$fixture" --data "$tmp/d.safetensors" \
    --output "$tmp/r1" --steps 3 --batch 7 --lr 1e-2 --checkpoint "$tmp/ck" \
    --checkpoint-every 2
expect 0 "experts trained" "stage1 with checkpoints"
run train stage1 "$fixture" --data "$tmp/d.safetensors" \
    --output "$tmp/r2" --steps 5 --batch 7 --lr 1e-2 --checkpoint "$tmp/ck" \
    --resume
expect 0 "experts trained" "stage1 --resume"
for a in math code style general gpt2; do
    cmp -s "$tmp/s1/$a/adapter_model.safetensors" \
        "$tmp/r2/$a/adapter_model.safetensors" ||
        fail "the resumed run's $a differs from the uninterrupted one's"
done

# Bad data: a message, exit 1, nothing written.
data "$tmp/w.safetensors" 12 || exit 99
run train stage1 "$fixture" --data "$tmp/w.safetensors" --output "$tmp/b1"
expect 1 "x must be [N, 13]" "stage1 with x too narrow" err
data "$tmp/t.safetensors" 13 task 3 9 || exit 99
run train stage1 "$fixture" --data "$tmp/t.safetensors" --output "$tmp/b1"
expect 1 "task of row 3 is 9" "stage1 with a task out of range" err
data "$tmp/n.safetensors" 13 nan 2 1 || exit 99
run train stage2 "$fixture" --data "$tmp/n.safetensors" --output "$tmp/b1"
expect 1 "x row 2, column 1 is not finite" "stage2 with NaN" err
[ -e "$tmp/b1" ] && fail "a refused run left $tmp/b1"
run train stage1 "$fixture" --data "$tmp/d.safetensors" --output "$tmp/b1" \
    --batch 0
expect 2 "--batch '0' must be" "stage1 --batch 0" err
run train trex "$fixture" --data "$tmp/d.safetensors" --output "$tmp/b1"
expect 1 "no rank-1 output module" "trex over LoRA experts" err
run train trix "$fixture" --data "$tmp/d.safetensors" --output "$tmp/b1"
expect 2 "unknown recipe 'trix'" "an unknown recipe" err

# T-REX from instruction embeddings: embeddings -> atmoe cluster ->
# centroids in the manifest -> atmoe train trex (the data's embeddings
# scored against them in the graph) -> atmoe run on the same embeddings,
# whose loss is the trainer's.
python3 - "$tmp" <<'PY' || exit 99
import json, math, random, struct, sys
d = sys.argv[1]
rnd = random.Random(11)
def save(path, tensors):
    blobs, header, off = [], {}, 0
    for name, (dtype, shape, flat) in tensors.items():
        b = struct.pack("<%d%s" % (len(flat), "i" if dtype == "I32" else "f"),
                        *flat)
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
din, dout, E, S, D, n = 7, 5, 4, 8, 6, 96
w0 = [rnd.uniform(-0.4, 0.4) for _ in range(dout * din)]
a = [rnd.uniform(-1, 1) / math.sqrt(din) for _ in range(E * din)]
save(d + "/w.safetensors", {"w0": ("F32", [dout, din], w0),
                            "a": ("F32", [E, din], a),
                            "b": ("F32", [dout, E], [0.0] * (dout * E))})
# Samples in E clusters of embeddings; each cluster its own change.
centre = [[rnd.gauss(0, 1) for _ in range(D)] for _ in range(E)]
emb = [[c + 0.1 * rnd.gauss(0, 1) for c in centre[s % E]] for s in range(S)]
ta = [[rnd.uniform(-0.5, 0.5) for _ in range(din)] for _ in range(E)]
tb = [[rnd.uniform(-0.5, 0.5) for _ in range(E)] for _ in range(dout)]
x = [[rnd.uniform(-1, 1) for _ in range(din)] for _ in range(n)]
sample = [i % S for i in range(n)]
y = []
for i in range(n):
    k = sample[i] % E
    u = sum(ta[k][j] * x[i][j] for j in range(din))
    y.append([sum(w0[o * din + j] * x[i][j] for j in range(din)) +
              tb[o][k] * u for o in range(dout)])
flat = lambda m: [v for r in m for v in r]
save(d + "/emb.safetensors", {"embeddings": ("F32", [S, D], flat(emb))})
save(d + "/trex.safetensors", {
    "x": ("F32", [n, din], flat(x)), "y": ("F32", [n, dout], flat(y)),
    "sample": ("I32", [n], sample),
    "embeddings": ("F32", [S, D], flat(emb))})
save(d + "/trex-none.safetensors", {
    "x": ("F32", [n, din], flat(x)), "y": ("F32", [n, dout], flat(y)),
    "sample": ("I32", [n], sample)})
save(d + "/trex-in.safetensors", {
    "x": ("F32", [n, din], flat(x)), "gate_index": ("I32", [n], sample),
    "embeddings": ("F32", [S, D], flat(emb))})
with open(d + "/y-trex.json", "w") as f:
    json.dump(flat(y), f)
m = {"version": 1, "weights": "w.safetensors",
     "centroids": {"file": "c.safetensors", "tensor": "centroids"},
     "layers": [{"modules": {"proj": {"weight": "w0", "rank1": {
         "a": "a", "b": "b", "variant": "v1"}}}}]}
with open(d + "/trex.json", "w") as f:
    json.dump(m, f)
del m["centroids"]
with open(d + "/trex-nc.json", "w") as f:
    json.dump(m, f)
PY
run cluster "$tmp/emb.safetensors" --k 4 --normalize --output "$tmp/c.safetensors"
expect 0 "" "atmoe cluster of the embeddings"
run train trex "$tmp/trex.json" --data "$tmp/trex.safetensors" \
    --output "$tmp/tx" --steps 100 --batch 16 --lr 1e-2 --log "$tmp/tlog.json"
expect 0 "rank-1 experts trained" "trex on embeddings"
trained=$(sed -n 's/^rank-1 experts trained: loss \([^ ]*\) .*/\1/p' "$tmp/out")
run run "$tmp/tx/manifest.json" --input "$tmp/trex-in.safetensors" \
    --output "$tmp/ty.safetensors"
expect 0 "" "atmoe run of the T-REX manifest on the embeddings"
if ! python3 - "$tmp" "$trained" <<'PY'
import json, struct, sys
d, trained = sys.argv[1], float(sys.argv[2])
b = open(d + "/ty.safetensors", "rb").read()
n = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + n])
o = h["y"]["data_offsets"]
got = struct.unpack("<%df" % ((o[1] - o[0]) // 4), b[8 + n + o[0]:8 + n + o[1]])
want = json.load(open(d + "/y-trex.json"))
mse = sum((g - w) ** 2 for g, w in zip(got, want)) / len(want)
log = [json.loads(l) for l in open(d + "/tlog.json")]
done = [l for l in log if l["done"]]
ok = abs(mse - trained) <= 1e-4 * mse and len(done) == 1 and \
    done[0]["skipped"] == 0 and done[0]["initial_loss"] > 2 * trained
print("atmoe run %.6g, trainer %.6g, initial %s" % (
    mse, trained, done[0]["initial_loss"] if done else None))
sys.exit(0 if ok else 1)
PY
then
    fail "atmoe run's loss of the T-REX manifest is not the trainer's"
fi
# Too high a rate closes the main gate: no progress, exit 1, the gate
# named, nothing written; the log says the steps ran (none skipped).
run train trex "$tmp/trex.json" --data "$tmp/trex.safetensors" \
    --output "$tmp/tz" --steps 100 --batch 16 --lr 0.1 --log "$tmp/zlog.json"
expect 1 "made no progress" "trex at lr 0.1" err
expect 1 "the gates saturated: c = " "trex at lr 0.1" err
[ -e "$tmp/tz" ] && fail "a run that did not train left its output"
grep -q '"done": true.*"skipped": 0, "initial_loss": [0-9]' "$tmp/zlog.json" ||
    fail "the log of the run at lr 0.1 lacks its done line's counts"
run train trex "$tmp/trex-nc.json" --data "$tmp/trex.safetensors" \
    --output "$tmp/tz"
expect 1 "names no centroids" "trex on embeddings without centroids" err
run train trex "$tmp/trex.json" --data "$tmp/trex-none.safetensors" \
    --output "$tmp/tz"
expect 1 "or embeddings [S, D]" "trex on neither scores nor embeddings" err
[ -e "$tmp/tz" ] && fail "a refused run left its output"

# A checkpoint onto a full file system (a 64 KiB tmpfs; root only, skipped
# otherwise): a message, no output, no file left there.
if [ "$(id -u)" -eq 0 ] && mkdir "$tmp/full" &&
    mount -t tmpfs -o size=64k tmpfs "$tmp/full" 2> /dev/null; then
    cat /dev/zero > "$tmp/full/filler" 2> /dev/null
    run train stage1 "$fixture" --data "$tmp/d.safetensors" \
        --output "$tmp/f1" --steps 2 --checkpoint "$tmp/full/ck"
    expect 1 "No space left" "stage1 checkpointing onto a full file system" err
    [ -e "$tmp/f1" ] && fail "a failed run left its output"
    ls "$tmp/full" | grep -q -v '^filler$' &&
        fail "a failed run left a file on the full file system: $(ls "$tmp/full")"
    # The adapters themselves onto it: none is left half written.
    run train stage1 "$fixture" --data "$tmp/d.safetensors" \
        --output "$tmp/full/out" --steps 2
    expect 1 "No space left" "stage1 writing onto a full file system" err
    ls "$tmp/full" | grep -q -v '^filler$' &&
        fail "a failed run left output on the full file system: $(ls "$tmp/full")"
    umount "$tmp/full"
else
    echo "SKIP (not root, or no tmpfs mount here): a full file system"
fi

# The demonstration at a small size.
run train demo --rows 100 --seed 0 --json "$tmp/demo.json"
expect 0 "router accuracy" "train demo"
if ! python3 - "$tmp/demo.json" <<'PY'
import json, math, sys
d = json.load(open(sys.argv[1]))
loss = {r["method"]: r["heldout_loss"] for r in d["rows"]}
# T-REX: present, finite and below the untrained stack's loss (no target
# beyond that).
trex = loss.get("trex")
trex_ok = trex is not None and math.isfinite(trex) and \
    math.isfinite(d["untrained_loss"]) and trex < d["untrained_loss"]
ok = loss["routed"] <= 1.5 * loss["per-task"] and \
    loss["routed"] <= 0.7 * loss["single-lora"] and \
    d["router_accuracy"] >= 0.9 and trex_ok and "skipped" not in d
print("routed/per-task %.3f routed/single %.3f accuracy %.3f trex %s "
      "untrained %.4g" % (
    loss["routed"] / loss["per-task"], loss["routed"] / loss["single-lora"],
    d["router_accuracy"], trex, d["untrained_loss"]))
sys.exit(0 if ok else 1)
PY
then
    fail "the demonstration missed its targets"
fi

finish "atmoe train"
