#!/usr/bin/python3
"""Writes the PyTorch reference of kdist's GPT that tests/test_gpt_torch.c checks against.

Run with the system Python that has torch (1.13; `KD_WITH_TORCH=1 scripts/install-deps.sh`):
    /usr/bin/python3 tests/data/make_gpt_fixtures.py

There is no `transformers` package here, so this file carries its own GPT-2 with Hugging
Face's module names and maths (GPT2LMHeadModel: Conv1D weights [in, out], gelu_new, pre-LN,
the head tied to wte). Writes, next to this script:
    gpt_small/config.json, gpt_small/model.safetensors
        a Hugging Face model directory as older hub files have it: names with `transformer.`,
        the attention-mask buffers h.<i>.attn.bias / masked_bias, and lm_head.weight (= wte)
    gpt_small_io.safetensors
        tokens, targets (B,T) I32; logits (B,T,V); loss (1); grad.<name> for every parameter;
        step_tokens (STEPS,B,T+1) I32, step_loss (STEPS), step_lr (STEPS) and final.<name>:
        STEPS AdamW steps (decay on 2-D weights only, clipping, warm-up + cosine)
Output is deterministic: fixed seed, fixed tensor order, compact JSON.
"""
import json
import math
import os
import sys

import numpy as np
import torch
from torch import nn

import make_fixtures  # the safetensors writer, beside this script

HERE = os.path.dirname(os.path.abspath(__file__))
CFG = dict(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=67)
B, T = 3, 16
STEPS = 10
OPT = dict(lr=3e-3, min_lr=3e-4, warmup=3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
           clip=1.0)


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: y = x W + b, W [in, out]."""

    def __init__(self, nin, nout):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nin, nout))
        self.bias = nn.Parameter(torch.zeros(nout))

    def forward(self, x):
        shape = x.size()[:-1] + (self.weight.size(1),)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(shape)


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class Attention(nn.Module):
    def __init__(self, c, nh, ctx):
        super().__init__()
        self.nh = nh
        self.c_attn = Conv1D(c, 3 * c)
        self.c_proj = Conv1D(c, c)
        self.register_buffer("bias", torch.tril(torch.ones(ctx, ctx)).view(1, 1, ctx, ctx))
        self.register_buffer("masked_bias", torch.tensor(-1e4))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        heads = lambda y: y.view(b, t, self.nh, c // self.nh).transpose(1, 2)
        q, k, v = heads(q), heads(k), heads(v)
        w = q @ k.transpose(-1, -2) / math.sqrt(c // self.nh)
        mask = self.bias[:, :, :t, :t].bool()
        w = torch.where(mask, w, torch.tensor(torch.finfo(w.dtype).min))
        a = torch.softmax(w, dim=-1) @ v
        return self.c_proj(a.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = Conv1D(c, 4 * c)
        self.c_proj = Conv1D(4 * c, c)

    def forward(self, x):
        return self.c_proj(gelu_new(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, c, nh, ctx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c, eps=1e-5)
        self.attn = Attention(c, nh, ctx)
        self.ln_2 = nn.LayerNorm(c, eps=1e-5)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg["n_embd"]
        self.wte = nn.Embedding(cfg["vocab_size"], c)
        self.wpe = nn.Embedding(cfg["n_positions"], c)
        self.h = nn.ModuleList(
            [Block(c, cfg["n_head"], cfg["n_positions"]) for _ in range(cfg["n_layer"])])
        self.ln_f = nn.LayerNorm(c, eps=1e-5)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.transformer = GPT2Model(cfg)
        self.lm_head = nn.Linear(cfg["n_embd"], cfg["vocab_size"], bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as Hugging Face ties them

    def forward(self, idx):
        return self.lm_head(self.transformer(idx))


def init(model, seed):
    """Random everything (biases and layernorm gains too), so every path carries a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_f.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def params(model):
    """(Hugging Face name without prefix, tensor) in state_dict order, parameters only."""
    return [(n[len("transformer."):], p) for n, p in model.named_parameters()
            if n.startswith("transformer.")]


def write_safetensors(path, tensors, metadata=None):
    make_fixtures.write_safetensors(path, tensors, metadata)
    print("wrote %s (%d bytes)" % (os.path.relpath(path), os.path.getsize(path)))


def lr_at(step):
    """kd_schedule_lr's cosine with linear warm-up (total = STEPS)."""
    o = OPT
    if step < o["warmup"]:
        return o["lr"] * (step + 1) / o["warmup"]
    t, t_max = step - o["warmup"], STEPS - o["warmup"]
    return o["min_lr"] + (o["lr"] - o["min_lr"]) * (1 + math.cos(math.pi * t / t_max)) / 2


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = CFG
    V = cfg["vocab_size"]
    model = GPT2LMHeadModel(cfg)
    init(model, 1)

    out_dir = os.path.join(HERE, "gpt_small")
    os.makedirs(out_dir, exist_ok=True)
    config = dict(cfg, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=T,
                  activation_function="gelu_new", layer_norm_epsilon=1e-5, n_inner=None,
                  tie_word_embeddings=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    # state_dict as an older hub file: every tensor, buffers and lm_head included
    write_safetensors(os.path.join(out_dir, "model.safetensors"),
                      list(model.state_dict().items()), {"format": "pt"})

    g = torch.Generator().manual_seed(2)
    windows = torch.randint(0, V, (B, T + 1), generator=g)
    tokens, targets = windows[:, :-1], windows[:, 1:]
    logits = model(tokens)
    loss = nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    model.zero_grad()
    loss.backward()
    io = [("tokens", tokens.to(torch.int32)), ("targets", targets.to(torch.int32)),
          ("logits", logits.detach()), ("loss", loss.detach().reshape(1))]
    io += [("grad." + n, p.grad.clone()) for n, p in params(model)]

    # STEPS AdamW steps, nanoGPT's groups: decay the 2-D weights, not biases and gains
    decay = [p for n, p in params(model) if p.dim() == 2]
    no_decay = [p for n, p in params(model) if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPT["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=OPT["lr"], betas=OPT["betas"], eps=OPT["eps"], foreach=False)
    step_tokens = torch.randint(0, V, (STEPS, B, T + 1), generator=g)
    losses, lrs = [], []
    for s in range(STEPS):
        x, y = step_tokens[s, :, :-1], step_tokens[s, :, 1:]
        l = nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
        opt.zero_grad()
        l.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params(model)], OPT["clip"])
        for group in opt.param_groups:
            group["lr"] = lr_at(s)
        opt.step()
        losses.append(l.item())
        lrs.append(lr_at(s))
    io += [("step_tokens", step_tokens.to(torch.int32)),
           ("step_loss", torch.tensor(losses, dtype=torch.float32)),
           ("step_lr", torch.tensor(lrs, dtype=torch.float32))]
    io += [("final." + n, p.detach().clone()) for n, p in params(model)]
    write_safetensors(os.path.join(HERE, "gpt_small_io.safetensors"), io, {"format": "pt"})
    print("loss %.6f; %d AdamW steps: %s" % (loss.item(), STEPS,
                                            " ".join("%.4f" % v for v in losses)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
