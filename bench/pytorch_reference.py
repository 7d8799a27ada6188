#!/usr/bin/python3
"""The same recipe in PyTorch, for comparing kdist's accuracy with a plain PyTorch loop.

Reads a kdist recipe (the keys kdist resolves: run `kdist recipe check R > resolved.yaml` first
so every default is explicit), builds the same nn.Sequential, the same split sizes, SGD with
Nesterov momentum and weight decay, OneCycleLR (no momentum cycling, as kdist), batch 128,
and prints test accuracy and samples/s. Needs Debian's python3-torch and python3-yaml
(reference only: kdist never needs them).
    /usr/bin/python3 bench/pytorch_reference.py RESOLVED_RECIPE.yaml [--seed N]
"""
import argparse
import gzip
import os
import time

import numpy as np
import torch
import yaml
from torch import nn


def load_idx(path):
    with gzip.open(path) if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def build(layers, in_shape):
    mods, shape = [], list(in_shape)
    for l in layers:
        t = l["type"]
        if t == "flatten":
            mods.append(nn.Flatten()); shape = [int(np.prod(shape))]
        elif t == "linear":
            mods.append(nn.Linear(shape[0], l["out_features"])); shape = [l["out_features"]]
        elif t == "conv2d":
            k, s, p = l["kernel"], l.get("stride", 1), l.get("padding", 0)
            mods.append(nn.Conv2d(shape[0], l["out_channels"], k, s, p))
            shape = [l["out_channels"], (shape[1] + 2 * p - k) // s + 1, (shape[2] + 2 * p - k) // s + 1]
        elif t == "maxpool2d":
            k, s = l["kernel"], l.get("stride", l["kernel"])
            mods.append(nn.MaxPool2d(k, s)); shape = [shape[0], (shape[1] - k) // s + 1, (shape[2] - k) // s + 1]
        elif t == "relu":
            mods.append(nn.ReLU())
        elif t == "gelu":
            mods.append(nn.GELU())
        elif t == "dropout":
            mods.append(nn.Dropout(l["p"]))
    return nn.Sequential(*mods)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    r = yaml.safe_load(open(a.recipe))
    seed = r["seed"] if a.seed is None else a.seed
    torch.manual_seed(seed)
    torch.set_num_threads(a.threads)
    d = r["data"]
    xs = load_idx(os.path.join(d["dir"], d["train_images"]))
    ys = load_idx(os.path.join(d["dir"], d["train_labels"]))
    xt = load_idx(os.path.join(d["dir"], d["test_images"]))
    yt = load_idx(os.path.join(d["dir"], d["test_labels"]))
    g = np.random.default_rng(seed)
    perm = g.permutation(len(xs))
    val = d["val_size"]
    tr = np.sort(perm[val:])
    x = torch.tensor(xs[tr], dtype=torch.float32).unsqueeze(1) / 255.0
    y = torch.tensor(ys[tr], dtype=torch.int64)
    x_test = torch.tensor(xt, dtype=torch.float32).unsqueeze(1) / 255.0
    y_test = torch.tensor(yt, dtype=torch.int64)
    model = build(r["student"]["layers"], [1, 28, 28])
    o, sc, t = r["optim"], r["schedule"], r["train"]
    opt = torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"],
                          nesterov=o["nesterov"], weight_decay=o["weight_decay"])
    steps_per_epoch = (len(x) + t["batch_size"] - 1) // t["batch_size"]
    total = steps_per_epoch * t["epochs"]
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=o["lr"], total_steps=total, pct_start=sc["pct_start"],
        div_factor=sc["div_factor"], final_div_factor=sc["final_div_factor"], cycle_momentum=False)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.time()
    for epoch in range(t["epochs"]):
        model.train()
        order = torch.randperm(len(x))
        for i in range(steps_per_epoch):
            idx = order[i * t["batch_size"]:(i + 1) * t["batch_size"]]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    secs = time.time() - t0
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"pytorch {os.path.basename(a.recipe)} seed {seed}: test accuracy {acc:.4f}, "
          f"{len(x) * t['epochs'] / secs:.0f} samples/s ({a.threads} threads)")


if __name__ == "__main__":
    main()
