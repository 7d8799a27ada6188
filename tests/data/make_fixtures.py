#!/usr/bin/python3
"""Writes the PyTorch reference fixtures that tests/test_checkpoint.c checks kdist against.

Run from anywhere with the system Python that has torch (1.13):
    /usr/bin/python3 tests/data/make_fixtures.py

Writes, next to this script:
    mlp_small.safetensors, cnn_small.safetensors   state_dicts named layers.<i>.weight/bias
    mlp_small_io.safetensors, cnn_small_io.safetensors   `inputs` (8,1,28,28) and `logits` (8,10)

The safetensors package is not needed: the format (u64 LE header length, JSON header padded
with spaces to a multiple of 8, raw little-endian data) is written here by hand and read back.
Output is deterministic: fixed seed, fixed tensor order, compact JSON.
"""
import gzip
import json
import os
import struct
import sys

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
N_SAMPLES = 8


class Net(nn.Module):
    """Holds the Sequential as `layers`, so state_dict names are layers.<i>.weight."""

    def __init__(self, *mods):
        super().__init__()
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


def mlp():
    return Net(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def cnn():
    # 1x28x28 -conv(4,3,p1)-> 4x28x28 -pool2-> 4x14x14 -conv(8,3,s2,p1)-> 8x7x7 -pool2-> 8x3x3
    return Net(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 10))


# torch dtype -> (safetensors dtype, little-endian numpy dtype)
DTYPES = {torch.float32: ("F32", "<f4"), torch.int32: ("I32", "<i4")}


def write_safetensors(path, tensors, metadata=None):
    """tensors: list of (name, float32 or int32 torch tensor), written in this order."""
    header = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    blobs, offset = [], 0
    for name, t in tensors:
        dtype, np_dtype = DTYPES[t.dtype]
        a = t.detach().contiguous().numpy().astype(np_dtype, copy=False)
        b = a.tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    meta = header.pop("__metadata__", {})
    out, pos = {}, 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        b, end = e["data_offsets"]
        assert e["dtype"] == "F32" and b == pos, (name, e)
        a = np.frombuffer(data[b:end], dtype="<f4").reshape(e["shape"])
        out[name] = torch.from_numpy(a.copy())
        pos = end
    assert pos == len(data), path
    return out, meta


def load_inputs():
    with gzip.open(FASHION, "rb") as f:
        raw = f.read()
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    assert magic == 2051 and rows == 28 and cols == 28 and n >= N_SAMPLES, FASHION
    px = np.frombuffer(raw[16:16 + N_SAMPLES * 28 * 28], dtype=np.uint8)
    x = px.astype(np.float32).reshape(N_SAMPLES, 1, 28, 28) / np.float32(255.0)
    return torch.from_numpy(x)


def make(name, build, seed, x):
    torch.manual_seed(seed)
    model = build().eval()
    with torch.no_grad():
        logits = model(x)
    sd = model.state_dict()
    params = [(k, v) for k, v in sd.items()]
    model_path = os.path.join(HERE, name + ".safetensors")
    io_path = os.path.join(HERE, name + "_io.safetensors")
    write_safetensors(model_path, params, {"format": "pt"})
    write_safetensors(io_path, [("inputs", x), ("logits", logits)], {"format": "pt"})

    # Read back: the bytes must round-trip, and the loaded weights must give the same logits.
    back, meta = read_safetensors(model_path)
    assert meta == {"format": "pt"} and list(back) == list(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    fresh = build().eval()
    fresh.load_state_dict(back)
    io, _ = read_safetensors(io_path)
    with torch.no_grad():
        assert torch.equal(fresh(io["inputs"]), io["logits"])
    assert torch.equal(io["inputs"], x)

    for path in (model_path, io_path):
        print("wrote %s (%d bytes)" % (os.path.relpath(path), os.path.getsize(path)))
    for k, v in sd.items():
        print("  %-16s %s" % (k, list(v.shape)))
    print("  logits[0] = %s" % ["%.6f" % v for v in logits[0].tolist()])


def main():
    torch.set_num_threads(1)
    x = load_inputs()
    make("mlp_small", mlp, 1, x)
    make("cnn_small", cnn, 2, x)
    return 0


if __name__ == "__main__":
    sys.exit(main())
