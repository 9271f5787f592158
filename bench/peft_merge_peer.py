#!/usr/bin/env python3
"""peft_merge_peer.py: the peer of `rlb-bench-sync --device cuda --lora` (issue 14): what a
LoRA trainer does without rlbridge's merge to hand its rollout engine merged weights --
PEFT's merge_and_unload() (per target: delta = (B @ A) * scaling, W += delta, in bf16 on the
GPU, as peft's LoraLayer.merge does) plus a copy of every weight into the worker's
tensor-parallel layout (TP 1: one bf16 buffer, fused qkv and gate_up, 256-byte aligned
tensors, as model/tp_layout.h lays it out), timed with CUDA events.

torch only (no peft needed). Shape: Llama-3.1-8B (hidden 4096, 32 layers, intermediate
14336, 32 heads / 8 kv heads, vocab 128256, untied lm_head), bf16, adapters of rank 16 and
64 (alpha 2r) on q, k, v, o, gate, up and down of every layer. Prints one line per rank
(median of REPS runs after a warm-up), a JSON line, and last the arguments that hand the
times to the bench, so one device call runs both:
    build/rlb-bench-sync --device cuda --lora $(python3 bench/peft_merge_peer.py | tail -1)
"""
import argparse
import json

import torch

HIDDEN, LAYERS, INTER, HEADS, KV, VOCAB = 4096, 32, 14336, 32, 8, 128256
HEAD_DIM = HIDDEN // HEADS
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
REPS = 5


def shapes():
    """[out, in] of each target of a layer."""
    q, kv = HEADS * HEAD_DIM, KV * HEAD_DIM
    return dict(q=(q, HIDDEN), k=(kv, HIDDEN), v=(kv, HIDDEN), o=(HIDDEN, q),
                gate=(INTER, HIDDEN), up=(INTER, HIDDEN), down=(HIDDEN, INTER))


class Layout:
    """Byte offsets (in elements) of the TP-1 worker buffer's tensors, 256-byte aligned."""

    def __init__(self):
        self.end, self.at = 0, {}

    def add(self, key, numel):
        start = (self.end * 2 + 255) // 256 * 256 // 2
        self.at[key] = start
        self.end = start + numel


def build(device):
    s = shapes()
    w = {}
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
                * 0.02).to(torch.bfloat16)

    w["embed"], w["head"] = rnd(VOCAB, HIDDEN), rnd(VOCAB, HIDDEN)
    w["norm"] = torch.ones(HIDDEN, device=device, dtype=torch.bfloat16)
    for layer in range(LAYERS):
        w[layer, "in_norm"] = torch.ones(HIDDEN, device=device, dtype=torch.bfloat16)
        w[layer, "post_norm"] = torch.ones(HIDDEN, device=device, dtype=torch.bfloat16)
        for t in TARGETS:
            w[layer, t] = rnd(*s[t])
    lay = Layout()
    lay.add("embed", VOCAB * HIDDEN)
    lay.add("norm", HIDDEN)
    lay.add("head", VOCAB * HIDDEN)
    for layer in range(LAYERS):
        lay.add((layer, "in_norm"), HIDDEN)
        lay.add((layer, "qkv"), (s["q"][0] + 2 * s["k"][0]) * HIDDEN)
        lay.add((layer, "o"), HIDDEN * s["o"][1])
        lay.add((layer, "post_norm"), HIDDEN)
        lay.add((layer, "gate_up"), 2 * INTER * HIDDEN)
        lay.add((layer, "down"), HIDDEN * INTER)
    dst = torch.empty(lay.end, device=device, dtype=torch.bfloat16)
    return w, lay, dst


def adapters(rank, device):
    s = shapes()
    gen = torch.Generator(device=device).manual_seed(rank)
    out = {}
    for layer in range(LAYERS):
        for t in TARGETS:
            o, i = s[t]
            a = (torch.randn(rank, i, generator=gen, device=device) / i ** 0.5)
            b = torch.randn(o, rank, generator=gen, device=device) * 0.01
            out[layer, t] = (a.to(torch.bfloat16), b.to(torch.bfloat16))
    return out


def merge_and_copy(w, lay, dst, ad, scaling):
    """merge_and_unload() of every adapter, then every weight into the worker's layout."""
    for key, (a, b) in ad.items():
        delta = (b @ a) * scaling  # LoraLayer.get_delta_weight
        w[key] += delta            # LoraLayer.merge: base_layer.weight.data += delta

    def put(key, *tensors):
        at = lay.at[key]
        for t in tensors:
            n = t.numel()
            dst[at:at + n].copy_(t.reshape(-1))
            at += n

    put("embed", w["embed"])
    put("norm", w["norm"])
    put("head", w["head"])
    for layer in range(LAYERS):
        put((layer, "in_norm"), w[layer, "in_norm"])
        put((layer, "qkv"), w[layer, "q"], w[layer, "k"], w[layer, "v"])
        put((layer, "o"), w[layer, "o"])
        put((layer, "post_norm"), w[layer, "post_norm"])
        put((layer, "gate_up"), w[layer, "gate"], w[layer, "up"])
        put((layer, "down"), w[layer, "down"])


def time_rank(w, lay, dst, rank, device):
    ad = adapters(rank, device)
    scaling = 2.0  # lora_alpha / r, with alpha = 2r as the bench declares
    merge_and_copy(w, lay, dst, ad, scaling)  # warm-up: cuBLAS handles, allocator
    times = []
    for _ in range(REPS):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        merge_and_copy(w, lay, dst, ad, scaling)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    del ad
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("peft_merge_peer.py: no GPU visible")
    device = torch.device("cuda", 0)
    w, lay, dst = build(device)
    ms = {}
    for r in args.ranks:
        ms[r] = time_rank(w, lay, dst, r, device)
        print(f"PEFT merge_and_unload + copy into the TP-1 layout, Llama-3.1-8B bf16, rank {r}: "
              f"{ms[r]:.3f} ms (median of {REPS})", flush=True)
    print(json.dumps(dict(peer="peft_merge_and_unload_copy", device=torch.cuda.get_device_name(0),
                          torch=torch.__version__, ms={str(r): round(v, 3) for r, v in ms.items()})))
    print(" ".join(f"--peer {r}:{v:.3f}" for r, v in ms.items()))


if __name__ == "__main__":
    main()
