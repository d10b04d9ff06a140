#!/usr/bin/python3
"""The training step loops of atmoe's recipes in PyTorch (atmoe-bench's
recipe-stage1, recipe-stage2 and recipe-trex workloads with --peer torch).

    python3 peer_train_torch.py --recipe stage1|stage2|trex --dir DIR
        --batch T --reps R --warmup W --threads N --lr LR

DIR is the bench's (bench/recipes.c): peer.safetensors holds the very
weights and rows the library trains on, under plain names (w0 [d, d], x
and y [N, d], task and sample [N], scores [S, E], the experts' A and B
stacked, the rank-1 A and B).  The loop is the recipe's: per step, the
batch's rows gathered by a shuffled index, the forward, the MSE against y,
backward, loss.item() (the loss read, as the recipes read it), AdamW's
step (torch.optim.AdamW, weight decay 0.01: atmoe_train_config_default's)
and zero_grad(set_to_none=True); W0 frozen.

  stage1  each expert e alone, on the rows of task e:
          y = x W0^T + s (x A_e^T) B_e^T, s = alpha / r = 2; A_e, B_e train
  stage2  the AT-MoE layer (SPEC section 3: 4 groups of 2, tau 1, c 1)
          over the frozen experts, W_G [d, 4] and W_D [d, 8] from zeros
  trex    T-REX v2 (SPEC section 4: r1 = 4, r2 = 8, k_r 32, k_s 4), each
          row's scores those of its sample; A, B, W_r (zeros), w_om, w_c
          (zeros) train

Unless the environment says otherwise, torch's OpenMP threads wait
passively (OMP_WAIT_POLICY=PASSIVE): on a machine shared with other work
(PoCL's threads, other programs) threads that spin at every barrier made a
step 10 to 40 times slower (median 56 ms against 1.4 ms for stage1 at
d = 512, T = 64, 2 threads, load average 6 on 2 cores).  Set
OMP_WAIT_POLICY=ACTIVE to time spinning threads on an idle machine.

Each model's first W steps are not timed, the next R are (with
time.perf_counter() around the whole step); one JSON line goes to stdout:
{"event": "result", "median_ms", "min_ms", "max_ms", "steps", "torch",
"python", "threads", "blas", "omp_wait_policy", "loss"} (or {"event":
"error", "message"}).
"""
import argparse
import json
import os
import platform
import statistics
import struct
import sys
import time


def emit(**fields):
    print(json.dumps(fields), flush=True)


def blas_libraries():
    """The BLAS libraries this process mapped (as bench/peer_torch.py
    says them): Debian's torch calls the system's libblas.so.3."""
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                name = os.path.basename(path)
                if ("blas" in name or "blis" in name or "mkl" in name) and \
                        path.startswith("/"):
                    short = os.path.join(os.path.basename(
                        os.path.dirname(path)), name)
                    if short not in found:
                        found.append(short)
    except OSError:
        pass
    return ", ".join(found) or "unknown"


def load(np, torch, path):
    """The tensors of a safetensors file (F32 and I32 only)."""
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        lo, hi = t["data_offsets"]
        dtype = {"F32": np.float32, "I32": np.int32}[t["dtype"]]
        a = np.frombuffer(raw, dtype=dtype, count=(hi - lo) // 4,
                          offset=8 + n + lo).reshape(t["shape"])
        out[name] = torch.from_numpy(a.copy())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True,
                    choices=["stage1", "stage2", "trex"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import numpy as np
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        emit(event="error", message="%s cannot import %s (install "
             "python3-torch)" % (sys.executable, e.name or e))
        sys.exit(1)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t = load(np, torch, os.path.join(a.dir, "peer.safetensors"))
    w0, x, y = t["w0"], t["x"], t["y"]
    task, sample = t["task"].long(), t["sample"].long()
    B, steps = a.batch, a.warmup + a.reps
    E, G, M, r = 8, 4, 2, 16
    times, last = [], None

    def train(params, rows, forward, seed):
        """The recipe's loop over rows: shuffled batches, timed steps."""
        nonlocal last
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
        g = torch.Generator().manual_seed(seed)
        order, pos = rows[torch.randperm(len(rows), generator=g)], 0
        for step in range(steps):
            t0 = time.perf_counter()
            if pos >= len(order):
                order, pos = rows[torch.randperm(len(rows), generator=g)], 0
            idx = order[pos:pos + B]
            pos += len(idx)
            loss = F.mse_loss(forward(idx), y[idx])
            loss.backward()
            last = loss.item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= a.warmup:
                times.append(time.perf_counter() - t0)

    ea = t["experts_a"].view(E, r, -1)
    eb = t["experts_b"].view(E, -1, r)
    if a.recipe == "stage1":
        for e in range(E):
            A = ea[e].clone().requires_grad_()
            Bm = eb[e].clone().requires_grad_()

            def fwd(idx, A=A, Bm=Bm):
                xb = x[idx]
                return F.linear(xb, w0) + 2.0 * F.linear(F.linear(xb, A), Bm)
            train([A, Bm], (task == e).nonzero().flatten(), fwd, e)
    elif a.recipe == "stage2":
        d = w0.shape[1]
        w_g = torch.zeros(d, G, requires_grad=True)
        w_d = torch.zeros(d, G * M, requires_grad=True)

        def fwd(idx):
            xb = x[idx]
            T = xb.shape[0]
            out = F.linear(xb, w0)
            ga = torch.softmax(xb @ w_g, -1)
            dd = torch.softmax((xb @ w_d).view(T, G, M), -1)
            gates = (ga.unsqueeze(-1) * dd).reshape(T, E)
            for e in range(E):
                out = out + gates[:, e:e + 1] * 2.0 * F.linear(
                    F.linear(xb, ea[e]), eb[e])
            return out
        train([w_g, w_d], torch.arange(x.shape[0]), fwd, 0)
    else:
        r1, r2 = 4, 8
        d = w0.shape[1]
        A = t["trex_a"].clone().requires_grad_()
        Bm = t["trex_b"].clone().requires_grad_()
        w_r = torch.zeros(r1 * r2, d, requires_grad=True)
        w_om = torch.zeros(1, requires_grad=True)
        w_c = torch.zeros(1, requires_grad=True)
        scores = t["scores"]

        def fwd(idx):
            xb = x[idx]
            T = xb.shape[0]
            p = torch.softmax(F.linear(xb, w_r), -1)
            om = torch.sigmoid(100 * w_om)
            gate = 32.0 * om * p + 4.0 * (1 - om) * scores[sample[idx]]
            z = torch.einsum("ti,tij->tj", F.linear(xb, A),
                             gate.view(T, r1, r2))
            return F.linear(xb, w0) + torch.sigmoid(100 * w_c) * F.linear(z, Bm)
        train([A, Bm, w_r, w_om, w_c], torch.arange(x.shape[0]), fwd, 0)
    blas = blas_libraries()
    ms = [1e3 * v for v in times]
    emit(event="result", median_ms=statistics.median(ms), min_ms=min(ms),
         max_ms=max(ms), steps=len(ms), torch=torch.__version__,
         python=platform.python_version(), threads=torch.get_num_threads(),
         blas=blas, omp_wait_policy=os.environ["OMP_WAIT_POLICY"],
         loss=last)


if __name__ == "__main__":
    try:
        main()
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        emit(event="error", message="%s: %s" % (type(e).__name__, e))
        sys.exit(1)
