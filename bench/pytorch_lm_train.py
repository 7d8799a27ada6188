#!/usr/bin/python3
"""The PyTorch loop a user would write for a kdist GPT recipe, to compare with `kdist train`.

    /usr/bin/python3 bench/pytorch_lm_train.py RECIPE [--kdist build/bin/kdist] [--threads N]
                                               [--compare runs/NAME/summary.json] [--check-init]

Same model (tests/data/make_gpt_fixtures.py: Hugging Face GPT-2 names and maths), same data
windows, optimizer, schedule and seed as kdist's in-process trainer (common/kd_train.c):
  - the token stream comes from `kdist data prepare` (so any data.tokenizer works), the files
    joined with end-of-text; the tail split into validation and test as kd_tokens_load_splits
    does, windows of context + 1 tokens `stride` apart;
  - the initial weights are kd_gpt_init_params' (splitmix64 streams, Box-Muller in double,
    N(0, 0.02), c_proj weights N(0, 0.02/sqrt(2 layers)), ones and zeros for the rest), and
    every epoch visits the windows in kd_rng_permutation's order: step for step the same
    batches;
  - AdamW (torch.optim.AdamW) with decay on 2-D weights only, clip_grad_norm_, and
    kd_schedule_lr's warm-up + cosine (or constant).
It prints the validation loss at every eval.every_steps and at the end, and with --compare the
difference from kdist's summary.json. --check-init asks kdist for its initial weights
(`kdist train` with optim.lr=1e-30 for one step) and checks they equal this script's bit for bit.
Not part of kdist: a reference, run by hand (README "Benchmarks").
"""
import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import yaml
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "data"))
import make_gpt_fixtures  # noqa: E402  (the reference model)

M64 = (1 << 64) - 1


# ---- kd_rng, bit for bit ------------------------------------------------------------------
def mix(x):
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def rng_key(seed, a, b):
    return mix(mix(mix(seed) ^ a) ^ b)


def splitmix_stream(key, n):
    """kd_rng_next's first n outputs from state key, as uint64 (vectorised)."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def normals(key, n):
    """kd_rng_normal n times: Box-Muller on two draws each, in double, cast to float."""
    z = splitmix_stream(key, 2 * n)
    u1 = ((z[0::2] >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 9007199254740992.0)
    u2 = (z[1::2] >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)).astype(np.float32)


def permutation(seed, stream, n):
    """kd_rng_permutation: Fisher-Yates with Lemire's unbiased bounded draws."""
    state = rng_key(seed, stream, 0x7065726D)
    perm = list(range(n))

    def draw():
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    for i in range(n, 1, -1):
        m = (draw() >> 32) * i
        low = m & 0xFFFFFFFF
        if low < i:
            threshold = ((1 << 32) - i) % i
            while low < threshold:
                m = (draw() >> 32) * i
                low = m & 0xFFFFFFFF
        j = m >> 32
        perm[i - 1], perm[j] = perm[j], perm[i - 1]
    return perm


# ---- the recipe's data ----------------------------------------------------------------------
def kdist_says(cmd):
    """stdout of a kdist command; its own error message and exit when it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit("%s\n(%s)" % (done.stderr.strip(), " ".join(cmd)))
    return done.stdout


def resolved_recipe(kdist, path):
    r = yaml.safe_load(kdist_says([kdist, "recipe", "check", path]))
    for section in ("optim", "schedule"):  # YAML 1.1 reads "1e-08" as a string
        for k, v in r[section].items():
            if isinstance(v, str) and k != "name":
                r[section][k] = float(v)
    return r


def read_llmc(path):
    with open(path, "rb") as f:
        head = np.frombuffer(f.read(1024), dtype=np.int32)
        assert head[0] == 20240520, "%s: not an llm.c shard" % path
        dtype = np.uint16 if head[1] == 1 else np.uint32
        return np.frombuffer(f.read(), dtype=dtype).astype(np.int64)


def token_stream(kdist, r):
    d = r["data"]
    files = [f if os.path.isabs(f) else os.path.join(d["dir"], f) for f in d["files"]]
    eot = 50256 if d["tokenizer"] == "gpt2" else 256
    parts = []
    if d["format"] == "tokens":
        parts = [read_llmc(f) for f in files]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [kdist, "data", "prepare", "--tokenizer", d["tokenizer"], "--out", tmp] + files
            if d.get("tokenizer_dir"):
                cmd[5:5] = ["--tokenizer-dir", d["tokenizer_dir"]]
            kdist_says(cmd)
            for f in files:
                stem = os.path.splitext(os.path.basename(f))[0]
                parts.append(read_llmc(os.path.join(tmp, stem + ".bin")))
    stream = []
    for i, p in enumerate(parts):
        if i:
            stream.append(np.array([eot], dtype=np.int64))
        stream.append(p)
    return np.concatenate(stream)


def windows(ids, context, stride, limit):
    window = context + 1
    n = 0 if len(ids) < window else (len(ids) - window) // stride + 1
    if limit:
        n = min(n, limit)
    idx = np.arange(n)[:, None] * stride + np.arange(window)[None, :]
    return torch.from_numpy(ids[idx])


def splits(ids, r):
    d, g = r["data"], r["student"]["gpt"]
    context = g["context"]
    stride = d.get("stride") or context
    f32 = lambda x: float(np.float32(x))  # the recipe keeps fractions as floats
    n_test = int(len(ids) * f32(d["test_fraction"]))
    n_val = int(len(ids) * f32(d["val_fraction"]))
    n_train = len(ids) - n_val - n_test
    train = windows(ids[:n_train], context, stride, d.get("train_subset", 0))
    val = windows(ids[n_train:n_train + n_val], context, stride, d.get("val_windows", 0))
    test = windows(ids[n_train + n_val:], context, stride, d.get("test_windows", 0))
    return train, val, test


# ---- model, initial weights, schedule -------------------------------------------------------
def build(r, vocab, seed):
    g = r["student"]["gpt"]
    cfg = dict(n_layer=g["layers"], n_embd=g["width"], n_head=g["heads"],
               n_positions=g["context"], vocab_size=g.get("vocab") or vocab)
    model = make_gpt_fixtures.GPT2LMHeadModel(cfg)
    key = rng_key(seed, 1, 0x696E6974)  # kd_train.c: kd_rng_key(seed, 1, "init")
    proj_std = np.float32(0.02) / np.sqrt(np.float32(2.0 * g["layers"]), dtype=np.float32)
    with torch.no_grad():
        for i, (name, p) in enumerate(make_gpt_fixtures.params(model)):
            if p.dim() == 2:
                std = proj_std if name.endswith("c_proj.weight") else np.float32(0.02)
                v = std * normals(rng_key(key, i, 0), p.numel())
                p.copy_(torch.from_numpy(v.reshape(p.shape)))
            elif "ln_" in name and name.endswith(".weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return model, cfg


def lr_at(r, step, total):
    s, lr = r["schedule"], r["optim"]["lr"]
    warmup = max(s.get("warmup_steps", 0), 0)
    if step < warmup:
        return lr * (step + 1) / warmup
    if s["name"] == "constant":
        return lr
    assert s["name"] == "cosine", "this reference knows constant and cosine schedules"
    t, t_max = step - warmup, total - warmup
    if t_max <= 0 or t >= t_max:
        return s["min_lr"]
    return s["min_lr"] + (lr - s["min_lr"]) * (1 + math.cos(math.pi * t / t_max)) / 2


def mean_loss(model, data, batch):
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            w = data[i:i + batch]
            logits = model(w[:, :-1])
            total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 w[:, 1:].reshape(-1), reduction="sum").item()
            count += w[:, 1:].numel()
    model.train()
    return total / count


def check_init(kdist, recipe_path, model):
    """kdist's initial weights: one step at lr 1e-30 leaves every weight as it was (the step is
    below a float's resolution of 0.02) and moves the zeros to about 1e-29."""
    with tempfile.TemporaryDirectory() as tmp:
        kdist_says([kdist, "train", recipe_path, "logging.runs_dir=" + tmp, "name=init",
                    "optim.lr=1e-30", "schedule.name=constant", "train.max_steps=1",
                    "data.val_windows=1", "data.test_windows=1"])
        with open(os.path.join(tmp, "init", "student.safetensors"), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            blob = f.read()
    same = True
    for name, p in make_gpt_fixtures.params(model):
        meta = header[name]
        lo, hi = meta["data_offsets"]
        theirs = np.frombuffer(blob[lo:hi], dtype=np.float32).reshape(meta["shape"])
        ours = p.detach().numpy()
        if not (np.array_equal(theirs, ours) if p.dim() == 2 else np.allclose(theirs, ours, 0, 1e-20)):
            print("init differs from kdist's in %s" % name)
            same = False
    print("initial weights: %s kdist's" % ("bit for bit" if same else "NOT"))
    return same


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--kdist", default=os.path.join(HERE, "..", "build", "bin", "kdist"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--compare", help="kdist's summary.json of the same recipe")
    ap.add_argument("--check-init", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    make_gpt_fixtures.gelu_new = lambda t: nn.functional.gelu(t, approximate="tanh")

    r = resolved_recipe(a.kdist, a.recipe)
    if r["data"]["format"] not in ("text", "tokens") or not r["student"].get("gpt", {}).get("layers"):
        sys.exit("%s: not a GPT recipe" % a.recipe)
    if r["optim"]["name"] != "adamw":
        sys.exit("%s: this reference implements adamw only" % a.recipe)
    seed = int(r["seed"])
    t_load = time.perf_counter()
    ids = token_stream(a.kdist, r)
    train, val, test = splits(ids, r)
    vocab = 50257 if r["data"]["tokenizer"] == "gpt2" else 257
    model, cfg = build(r, vocab, seed)
    if a.check_init and not check_init(a.kdist, a.recipe, model):
        return 1
    params = [p for _, p in make_gpt_fixtures.params(model)]
    o = r["optim"]
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() == 2], "weight_decay": o["weight_decay"]},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"])
    B, epochs = r["train"]["batch_size"], r["train"]["epochs"]
    per_epoch = (len(train) + B - 1) // B
    total = epochs * per_epoch
    if r["train"].get("max_steps"):
        total = min(total, r["train"]["max_steps"])
    every, eval_batch = r["eval"].get("every_steps", 0), r["eval"]["batch_size"]
    print("pytorch_lm_train %s: %d parameters, %d train / %d val / %d test windows, %d steps, "
          "%d threads, torch %s (data %.1f s)" %
          (r["name"], sum(p.numel() for p in params), len(train), len(val), len(test), total,
           torch.get_num_threads(), torch.__version__, time.perf_counter() - t_load), flush=True)

    t0, step, first_loss = time.perf_counter(), 0, None
    for epoch in range(epochs):
        perm = torch.tensor(permutation(seed, epoch, len(train)))
        for b in range(per_epoch):
            if step >= total:
                break
            w = train[perm[b * B:(b + 1) * B]]
            logits = model(w[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               w[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o["clip_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(params, o["clip_norm"])
            for group in opt.param_groups:
                group["lr"] = lr_at(r, step, total)
            opt.step()
            step += 1
            if first_loss is None:
                first_loss = loss.item()
                print("step 1 train loss %.6f" % first_loss, flush=True)
            if every and step % every == 0 and step < total:
                print("step %d/%d  train loss %.4f  val loss %.4f  (%.0f s)" %
                      (step, total, loss.item(), mean_loss(model, val, eval_batch),
                       time.perf_counter() - t0), flush=True)
    seconds = time.perf_counter() - t0
    tokens = step * B * (train.shape[1] - 1)
    val_loss = mean_loss(model, val, eval_batch)
    print("pytorch_lm_train %s: %d steps in %.1f s (%.0f tokens/s), val loss %.4f (%.4f bits per "
          "token)" % (r["name"], step, seconds, tokens / seconds, val_loss, val_loss / math.log(2)))
    if a.compare:
        with open(a.compare) as f:
            theirs = json.load(f)
        diff = val_loss - theirs["val_loss"]
        print("kdist val loss %.4f: PyTorch - kdist = %+.4f nats (%s 0.02)" %
              (theirs["val_loss"], diff, "within" if abs(diff) <= 0.02 else "NOT within"))
        return 0 if abs(diff) <= 0.02 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
