#!/usr/bin/python3
"""The PyTorch side of kd_bench_gpt: training and forward tokens/s of the same GPT-2.

The model is the one tests/data/make_gpt_fixtures.py checks kdist against (Hugging Face's
GPT2LMHeadModel names and maths: Conv1D, gelu_new, pre-LN, causal mask by torch.where, head
tied to wte). One training step is what kd_bench_gpt times on its side: forward, mean
next-token cross-entropy, backward, clip_grad_norm_ and AdamW (decay on 2-D weights only, as
nanoGPT groups them). The forward is model.eval() under torch.no_grad(), logits and loss.
Random tokens and GPT-2's N(0, 0.02) weights: the speed does not depend on the values.

kd_bench_gpt runs this with /usr/bin/python3 (Debian's python3-torch 1.13) as a server
(--serve), so that its timings interleave with kdist's in the same run: it prints
    ready threads=N torch=VERSION
once the model is built and warm, then answers each line `train SECONDS` or `forward SECONDS`
on stdin with `train|forward SECONDS_PER_CALL CPU_SECONDS_PER_CALL CALLS` (at least SECONDS of
calls), until `quit` or end of input. Without --serve it prints one summary line instead:
    pytorch_gpt train_tok_s=X forward_tok_s=Y threads=N torch=VERSION
for example
    OPENBLAS_NUM_THREADS=2 /usr/bin/python3 bench/pytorch_gpt.py --layers 2 --width 128 \\
        --heads 4 --context 256 --vocab 257 --batch 16 --threads 2
(torch's matmuls go to the system OpenBLAS, whose thread count is its own: kd_bench_gpt sets
OPENBLAS_NUM_THREADS and OMP_NUM_THREADS to --threads for this process.)
"""
import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data"))
import make_gpt_fixtures  # noqa: E402  (the reference model)


def timed(fn, seconds):
    """(wall, cpu) seconds per call of fn over at least `seconds` of calls, and the calls."""
    calls, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        calls += 1
        t = time.perf_counter() - t0
        if t >= seconds:
            return t / calls, (time.process_time() - c0) / calls, calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=257)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=1, help="best of this many timings")
    ap.add_argument("--warmups", type=int, default=2)
    ap.add_argument("--serve", action="store_true", help="answer timing requests on stdin")
    ap.add_argument("--gelu", choices=["fused", "hf"], default="fused",
                    help="fused: torch's gelu(approximate='tanh'), one kernel each way; hf: "
                         "Hugging Face's gelu_new as the fixture writes it (same maths, 8 ops)")
    ap.add_argument("--foreach", action="store_true",
                    help="AdamW's multi-tensor path (torch's default on CPU is the single-tensor one)")
    a = ap.parse_args()

    if a.gelu == "fused":
        make_gpt_fixtures.gelu_new = lambda t: nn.functional.gelu(t, approximate="tanh")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = dict(n_layer=a.layers, n_embd=a.width, n_head=a.heads, n_positions=a.context,
               vocab_size=a.vocab)
    model = make_gpt_fixtures.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    B, T, V = a.batch, a.context, a.vocab
    windows = torch.randint(0, V, (B, T + 1))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    params = [p for n, p in model.named_parameters() if n.startswith("transformer.")]
    decay = [p for p in params if p.dim() == 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8, foreach=a.foreach)

    def train_step():
        loss = nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def forward():
        with torch.no_grad():
            nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))

    def run(what, seconds):
        model.train(what == "train")
        return timed(train_step if what == "train" else forward, seconds)

    for _ in range(a.warmups):
        run("train", 0.0)
        run("forward", 0.0)
    if a.serve:
        print("ready threads=%d torch=%s" % (torch.get_num_threads(), torch.__version__),
              flush=True)
        for line in sys.stdin:
            words = line.split()
            if len(words) != 2 or words[0] not in ("train", "forward"):
                break
            wall, cpu, calls = run(words[0], float(words[1]))
            print("%s %.9f %.9f %d" % (words[0], wall, cpu, calls), flush=True)
        return 0
    t_train = min(run("train", a.seconds)[0] for _ in range(a.repeat))
    t_fwd = min(run("forward", a.seconds)[0] for _ in range(a.repeat))
    print("pytorch_gpt train_tok_s=%.1f forward_tok_s=%.1f threads=%d torch=%s" %
          (B * T / t_train, B * T / t_fwd, torch.get_num_threads(), torch.__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
