#!/usr/bin/python3
"""Writes the PyTorch reference of kdist's sparse per-token losses (kd_loss_sparse_row) that
tests/test_loss_sparse.c checks against.

Run with the system Python that has torch (1.13; `KD_WITH_TORCH=1 scripts/install-deps.sh`):
    /usr/bin/python3 tests/data/make_sparse_loss_fixtures.py

The maths is written from the definitions, in float64, with autograd for the gradients:
    loss = alpha * T^2 * D(P || Q) + (1 - alpha) * CE(z, y)
over buckets. Top-k: the k kept teacher logits and one rest bucket whose C - k logits share
exp(rest_lse) equally, all at temperature T; the student's buckets are its full softmax(z / T)
gathered at the ids and the mass outside them. Sampled: P is the empirical distribution of n
draws from softmax(teacher / T), forward KL only. A position with y = -1 does not count.
Writes sparse_loss_io.safetensors next to this script:
    z (R,V), y (R) I32, teacher (R,V) the dense logits the records come from,
    topk_ids (R,K) I32, topk_vals (R,K), topk_rest (R),
    sampled_ids (R,N) I32 (the draws, ascending: repeats are counts),
    per case <name>.loss (R) and <name>.grad (R,V), d(loss of the row)/dz;
    cases: topk.<divergence>.t<T>.a<alpha>, sampled.forward_kl.t<T>.a<alpha>.
Output is deterministic: fixed seed, fixed tensor order.
"""
import os

import torch

import make_fixtures  # the safetensors writer, beside this script

HERE = os.path.dirname(os.path.abspath(__file__))
R, V, K, N = 6, 50, 8, 12
DIVERGENCES = ["forward_kl", "reverse_kl", "symmetric_kl", "js"]
TEMPERATURES = [1.0, 2.5]
ALPHAS = [0.5, 1.0]


def kl(logp, logq):
    """KL(p || q) over buckets; terms with p = 0 are 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum()


def divergence(name, logp, logq):
    if name == "forward_kl":
        return kl(logp, logq)
    if name == "reverse_kl":
        return kl(logq, logp)
    if name == "symmetric_kl":
        return 0.5 * (kl(logp, logq) + kl(logq, logp))
    logm = torch.log(0.5 * (logp.exp() + logq.exp()))
    return 0.5 * (kl(logp, logm) + kl(logq, logm))


def student_buckets(z, ids, T, rest):
    """log of softmax(z / T) at ids, then (rest) of the mass outside them."""
    logq = torch.log_softmax(z / T, dim=0)
    out = logq[ids]
    if rest:
        outside = torch.ones(V, dtype=torch.bool)
        outside[ids] = False
        out = torch.cat([out, torch.logsumexp(logq[outside], dim=0).reshape(1)])
    return out


def topk_teacher(vals, rest_lse, T):
    m = float(V - K)
    rest_logit = torch.log(torch.tensor(m, dtype=torch.float64)) + (
        rest_lse - torch.log(torch.tensor(m, dtype=torch.float64))) / T
    return torch.log_softmax(torch.cat([vals / T, rest_logit.reshape(1)]), dim=0)


def row_loss(z, y, logp, logq_fn, div, T, alpha):
    if y < 0:
        return (z * 0).sum()
    ce = -torch.log_softmax(z, dim=0)[y]
    return alpha * T * T * divergence(div, logp, logq_fn(z)) + (1 - alpha) * ce


def case(z_all, y_all, teacher_of, logq_of, div, T, alpha):
    losses, grads = [], []
    for r in range(R):
        z = z_all[r].clone().requires_grad_(True)
        loss = row_loss(z, int(y_all[r]), teacher_of(r), lambda zz: logq_of(r, zz), div, T, alpha)
        loss.backward()
        losses.append(loss.detach())
        grads.append(z.grad.detach())
    return torch.stack(losses), torch.stack(grads)


def main():
    torch.manual_seed(7)
    dt = torch.float64
    # float32 values first, so the C test sees exactly these numbers
    z = (torch.randn(R, V) * 2.0).to(dt)
    teacher = (torch.randn(R, V) * 3.0).to(dt)
    y = torch.randint(0, V, (R,), dtype=torch.int32)
    y[R - 1] = -1
    top_vals, top_ids = torch.topk(teacher.float(), K, dim=1)
    top_vals = top_vals.to(dt)
    rest = []
    for r in range(R):
        outside = torch.ones(V, dtype=torch.bool)
        outside[top_ids[r]] = False
        rest.append(torch.logsumexp(teacher[r][outside].float(), dim=0))
    rest = torch.stack(rest).to(dt)

    tensors = [("z", z.float()), ("y", y), ("teacher", teacher.float()),
               ("topk_ids", top_ids.to(torch.int32)), ("topk_vals", top_vals.float()),
               ("topk_rest", rest.float())]
    for div in DIVERGENCES:
        for T in TEMPERATURES:
            for alpha in ALPHAS:
                loss, grad = case(z, y, lambda r: topk_teacher(top_vals[r], rest[r], T),
                                  lambda r, zz: student_buckets(zz, top_ids[r], T, True),
                                  div, T, alpha)
                name = "topk.%s.t%g.a%g" % (div, T, alpha)
                tensors += [(name + ".loss", loss.float()), (name + ".grad", grad.float())]

    # sampled: the draws at T = 2 (the cache's temperature), kept ascending
    T = 2.0
    draws = torch.multinomial(torch.softmax(teacher / T, dim=1), N, replacement=True)
    draws = torch.sort(draws, dim=1).values
    tensors.append(("sampled_ids", draws.to(torch.int32)))

    def empirical(r):
        ids, counts = torch.unique(draws[r], return_counts=True)
        return ids, torch.log(counts.to(dt) / N)

    for alpha in ALPHAS:
        loss, grad = case(z, y, lambda r: empirical(r)[1],
                          lambda r, zz: student_buckets(zz, empirical(r)[0], T, False),
                          "forward_kl", T, alpha)
        name = "sampled.forward_kl.t%g.a%g" % (T, alpha)
        tensors += [(name + ".loss", loss.float()), (name + ".grad", grad.float())]

    make_fixtures.write_safetensors(os.path.join(HERE, "sparse_loss_io.safetensors"), tensors)


if __name__ == "__main__":
    main()
