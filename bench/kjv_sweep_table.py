"""The table of bench/kjv_distill_sweep.sh from the runs' summary.json and comparison.json:
validation bits per byte per seed and their mean, the share of the gap between the student
alone and the teacher that distillation closes, calibration and agreement with the teacher,
cache bytes per token and wall time. Standard library only."""
import argparse
import json
import os
import statistics


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return None


def distilled_row(run_dir):
    comp = load(os.path.join(run_dir, "comparison.json")) or {}
    for row in comp.get("rows", []):
        if row.get("model") == "distilled":
            return row
    return {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--teacher", default="runs/kjv_gpt_teacher")
    ap.add_argument("--encodings", default="fp16 topk8 topk32 sampled12")
    ap.add_argument("--seeds", default="1 2 3")
    a = ap.parse_args()
    seeds = a.seeds.split()
    teacher = load(os.path.join(a.teacher, "summary.json")) or {}
    t_bpb = teacher.get("val_bits_per_byte")
    rows = [("alone", "kjv_alone_s%s")] + [(e, "kjv_distill_%s_s%%s" % e) for e in a.encodings.split()]
    alone_mean = None
    print("| student | cache B/token | val bpb (seeds %s) | mean | gap closed | ECE | agreement | KL to teacher | wall (s) |"
          % ", ".join(seeds))
    print("|---|---|---|---|---|---|---|---|---|")
    if t_bpb is not None:
        print("| teacher | - | %.4f | %.4f | - | - | - | - | %.0f |" % (t_bpb, t_bpb, teacher.get("wall_seconds", 0)))
    for label, pattern in rows:
        bpb, walls, ece, agree, kl, rb = [], [], [], [], [], "-"
        for s in seeds:
            d = os.path.join(a.runs, pattern % s)
            summ = load(os.path.join(d, "summary.json"))
            if not summ or summ.get("status") != "completed":
                continue
            bpb.append(summ["val_bits_per_byte"])
            walls.append(summ.get("wall_seconds", 0))
            rb = summ.get("teacher", {}).get("record_bytes_per_token", "-")
            row = distilled_row(d)
            if "val_ece" in row:
                ece.append(row["val_ece"])
            t = summ.get("teacher", {})
            if "val_agreement" in t:
                agree.append(t["val_agreement"])
                kl.append(t["val_kl"])
        if not bpb:
            print("| %s | - | (no completed run) | | | | | | |" % label)
            continue
        mean = statistics.mean(bpb)
        if label == "alone":
            alone_mean = mean
            rb = "-"
        closed = "-"
        if label != "alone" and alone_mean is not None and t_bpb is not None and alone_mean > t_bpb:
            closed = "%.0f%%" % (100.0 * (alone_mean - mean) / (alone_mean - t_bpb))
        fmt = lambda xs, f: (f % statistics.mean(xs)) if xs else "-"
        print("| %s | %s | %s | %.4f | %s | %s | %s | %s | %.0f |" % (
            label, rb, " / ".join("%.4f" % x for x in bpb), mean, closed, fmt(ece, "%.4f"),
            fmt(agree, "%.2f%%" if False else "%.4f"), fmt(kl, "%.4f"), statistics.mean(walls)))


if __name__ == "__main__":
    main()
