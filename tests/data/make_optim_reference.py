#!/usr/bin/python3
"""Reference values for tests/test_optim.c, computed with real PyTorch (1.13 at /usr/bin/python3).

Run:  /usr/bin/python3 tests/data/make_optim_reference.py
and paste the printed C arrays into tests/test_optim.c. Learning rates are printed as doubles
(%.17g); parameters as float32 (%.9g), enough to round-trip exactly.
"""
import torch


def lrs(make_sched, n, lr):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make_sched(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def show_doubles(name, values):
    print("static const double %s[%d] = {" % (name, len(values)))
    print("    " + ", ".join("%.17g" % v for v in values) + "};")


def show_floats(name, rows):
    print("static const float %s[%d][%d] = {" % (name, len(rows), len(rows[0])))
    for r in rows:
        print("    {" + ", ".join("%.9gf" % v for v in r) + "},")
    print("};")


sched = torch.optim.lr_scheduler
# OneCycleLR(max_lr=0.1, total_steps=100, pct_start=0.3, div 25, final_div 1e4), all 100 steps
show_doubles("ONECYCLE_100", lrs(lambda o: sched.OneCycleLR(
    o, max_lr=0.1, total_steps=100, pct_start=0.3, anneal_strategy="cos", div_factor=25.0,
    final_div_factor=1e4, three_phase=False, cycle_momentum=False), 100, 0.1))
# OneCycleLR(max_lr=0.05, total_steps=7, pct_start=0.3, div 10, final_div 100)
show_doubles("ONECYCLE_7", lrs(lambda o: sched.OneCycleLR(
    o, max_lr=0.05, total_steps=7, pct_start=0.3, anneal_strategy="cos", div_factor=10.0,
    final_div_factor=100.0, three_phase=False, cycle_momentum=False), 7, 0.05))
# OneCycleLR(max_lr=0.2, total_steps=2, pct_start=0.25): phase one ends before step 0 (-0.5)
show_doubles("ONECYCLE_2", lrs(lambda o: sched.OneCycleLR(
    o, max_lr=0.2, total_steps=2, pct_start=0.25, anneal_strategy="cos", div_factor=25.0,
    final_div_factor=1e4, three_phase=False, cycle_momentum=False), 2, 0.2))
# CosineAnnealingLR(lr=0.1, T_max=10, eta_min=0.001), steps 0..10
show_doubles("COSINE_10", lrs(lambda o: sched.CosineAnnealingLR(o, T_max=10, eta_min=0.001), 11, 0.1))
# StepLR(lr=0.1, step_size=3, gamma=0.5), steps 0..9
show_doubles("STEPLR_3", lrs(lambda o: sched.StepLR(o, step_size=3, gamma=0.5), 10, 0.1))

# Optimizers on a 5-element tensor with fixed gradients per step; params after each step.
P0 = [0.5, -1.25, 2.0, 0.0, -0.3]
GRADS = [[0.1, -0.2, 0.3, -0.4, 0.05],
         [-0.3, 0.1, 0.2, 0.6, -0.1],
         [0.25, 0.25, -0.5, 0.1, 0.0],
         [0.0, -0.1, 0.4, -0.2, 0.3]]


def run(make_opt, clip=None):
    p = torch.nn.Parameter(torch.tensor(P0, dtype=torch.float32))
    opt = make_opt([p])
    rows = []
    for g in GRADS:
        p.grad = torch.tensor(g, dtype=torch.float32)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p], max_norm=clip)
        opt.step()
        rows.append(p.detach().tolist())
    return rows


show_floats("SGD_NESTEROV", run(lambda ps: torch.optim.SGD(
    ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=False)))
show_floats("SGD_MOMENTUM_CLIP", run(lambda ps: torch.optim.SGD(
    ps, lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0, foreach=False), clip=0.5))
show_floats("ADAMW", run(lambda ps: torch.optim.AdamW(
    ps, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, foreach=False)))
show_floats("ADAMW_CLIP", run(lambda ps: torch.optim.AdamW(
    ps, lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, foreach=False), clip=0.3))
