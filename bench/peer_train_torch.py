#!/usr/bin/python3
"""The training loop of `atmoe train stage1` in PyTorch, on the same data.

Writes a problem to DIR (a one-layer stack: base weight [D, D], E expert
adapters of rank R as PEFT writes them, a manifest, and data x, y, task),
then trains each expert as a plain LoRA on its task's rows exactly as
atmoe_train_stage1 does (AdamW, constant rate, batches of B rows, S steps)
and prints the rows per second.  Run atmoe on the same files with

    atmoe train stage1 DIR/manifest.json --data DIR/data.safetensors \\
        --output DIR/out --steps S --batch B --lr 1e-3 --log DIR/log.json

and compare the log's tokens_per_second.
"""
import argparse
import json
import os
import struct
import time

import torch


def save_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        t = t.contiguous()
        dtype = {torch.float32: "F32", torch.int32: "I32"}[t.dtype]
        b = t.numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rows", type=int, default=2048, help="per task")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d, E, r = a.d, a.experts, a.rank
    os.makedirs(a.dir, exist_ok=True)
    w0 = torch.randn(d, d) / d ** 0.5
    n = a.rows * E
    task = torch.arange(n, dtype=torch.int32) % E
    x = torch.randn(n, d) + torch.randn(E, d)[task.long()]
    y = x @ w0.T + 0.1 * torch.randn(n, d)
    save_safetensors(os.path.join(a.dir, "base.safetensors"),
                     {"model.layers.0.proj.weight": w0})
    save_safetensors(os.path.join(a.dir, "data.safetensors"),
                     {"x": x, "y": y, "task": task})
    inits = []
    for e in range(E):
        ad = os.path.join(a.dir, "e%d" % e)
        os.makedirs(ad, exist_ok=True)
        A = (torch.rand(r, d) * 2 - 1) / d ** 0.5
        B = torch.zeros(d, r)
        inits.append((A, B))
        key = "base_model.model.model.layers.0.proj"
        save_safetensors(os.path.join(ad, "adapter_model.safetensors"),
                         {key + ".lora_A.weight": A,
                          key + ".lora_B.weight": B})
        with open(os.path.join(ad, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                       "target_modules": ["model.layers.0.proj"],
                       "bias": "none", "use_rslora": False,
                       "use_dora": False, "fan_in_fan_out": False,
                       "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}, f)
    with open(os.path.join(a.dir, "manifest.json"), "w") as f:
        json.dump({"version": 1, "weights": "base.safetensors",
                   "layers": [{"index": 0, "modules": {"proj": {
                       "weight": "model.layers.0.proj.weight",
                       "groups": [["e%d" % e] for e in range(E)]}}}]}, f)

    # The loop: per expert, shuffled rows of its task, AdamW (torch's
    # defaults but weight decay 0.01 as atmoe's), constant lr.
    s = 2.0
    total_rows, t0 = 0, time.perf_counter()
    for e in range(E):
        A = inits[e][0].clone().requires_grad_()
        B = inits[e][1].clone().requires_grad_()
        opt = torch.optim.AdamW([A, B], lr=1e-3, weight_decay=0.01)
        rows = (task == e).nonzero().flatten()
        g = torch.Generator().manual_seed(e)
        order, pos = rows[torch.randperm(len(rows), generator=g)], 0
        for _ in range(a.steps):
            if pos >= len(order):
                order, pos = rows[torch.randperm(len(rows), generator=g)], 0
            idx = order[pos:pos + a.batch]
            pos += len(idx)
            xb, yb = x[idx], y[idx]
            pred = xb @ w0.T + s * (xb @ A.T) @ B.T
            loss = torch.nn.functional.mse_loss(pred, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total_rows += len(idx)
    el = time.perf_counter() - t0
    print(json.dumps({"peer": "torch", "threads": torch.get_num_threads(),
                      "rows": total_rows, "seconds": el,
                      "tokens_per_second": total_rows / el,
                      "final_loss": float(loss)}))


if __name__ == "__main__":
    main()
