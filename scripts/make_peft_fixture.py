#!/usr/bin/env python3
"""make_peft_fixture.py: the PEFT golden fixture of the LoRA merge (DESIGN §10), which
tests/integration/test_peft_fixture.c syncs through the bridge and compares with.

Run where PyTorch, transformers and peft are installed (a CPU is enough; the GPU machine
has them), from the repository root:
    python3 scripts/make_peft_fixture.py [--out tests/fixtures/peft_lora]
It builds the llama_gqa model of tests/fixtures/make_fixtures.py (same config, weights drawn
the same way from its seed) in bfloat16, attaches a PEFT LoRA adapter (rank 8, alpha 16, on
q, k, v, o, gate, up and down of every layer) whose A and B are drawn from a fixed seed (PEFT
would start B at zero), and writes into OUT:
    config.json                 the model's config (save_pretrained)
    base.safetensors            the frozen base, bfloat16, HF names
    adapter_model.safetensors   the adapter as PEFT saves it (bfloat16, PEFT names), with
    adapter_config.json         its config (r, lora_alpha, target_modules)
    merged.safetensors          merge_and_unload()'s weights, bfloat16, HF names: merged in
                                float32 (every base and factor value is a bfloat16 value, so
                                the sum is the exact W + s * B * A up to float32 roundings)
                                and rounded to bfloat16 once, as a bridge merging in f32 does
    reference.json              seed, rank, alpha, versions, files with their sha256, and
                                how far PEFT's own bfloat16 merge lands from merged (in ulps)
Deterministic: the same seed gives the same bytes on any machine (CPU, one thread,
deterministic algorithms). Prints what it wrote. Keep the fixture small (< 2 MB).
"""
import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures"))
from make_fixtures import FIXTURES, make_config, redraw_weights  # noqa: E402

BASE_FIXTURE = "llama_gqa"
SEED = 2024
RANK = 8
ALPHA = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_BYTES = 2 << 20


def base_model():
    """llama_gqa of make_fixtures.py, its weights drawn as there, in bfloat16."""
    spec = FIXTURES[BASE_FIXTURE]
    config_cls, model_cls = spec["cls"]
    config = make_config(config_cls, spec["cfg"], spec["rope"])
    torch.manual_seed(spec["seed"])
    model = model_cls(config).to(torch.float32).eval()
    redraw_weights(model, torch.Generator().manual_seed(spec["seed"]))
    return model.to(torch.bfloat16)


@torch.no_grad()
def draw_adapters(model, gen):
    """A ~ N(0, 1/in), B ~ N(0, 0.05^2): deltas of about a third of the weights' spread."""
    for name, p in sorted(model.named_parameters()):
        if ".lora_A." in name:
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        elif ".lora_B." in name:
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def bf16_ulps(a, b):
    """Largest distance between two bfloat16 tensors in units in the last place of b."""
    a, b = a.to(torch.float32), b.to(torch.float32)
    exp = torch.floor(torch.log2(b.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)))
    return float(((a - b).abs() / torch.exp2(exp - 7)).max())


def save(tensors, path):
    from safetensors.torch import save_file
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in tensors.items()}, path)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "tests", "fixtures", "peft_lora"))
    args = ap.parse_args()
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")

    model = base_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lcfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                      bias="none", init_lora_weights=False)
    pm = get_peft_model(model, lcfg).to(torch.bfloat16)  # PEFT may keep adapters in f32
    draw_adapters(pm, torch.Generator().manual_seed(SEED))
    pm.eval()

    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp, safe_serialization=True)  # also writes a model card
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copyfile(os.path.join(tmp, f), os.path.join(args.out, f))
    pm.base_model.model.config.save_pretrained(args.out)

    # PEFT's own merge in bfloat16, kept only to say how far it lands from the exact one.
    bf16_merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    merged = pm.to(torch.float32).merge_and_unload().state_dict()
    save(base, os.path.join(args.out, "base.safetensors"))
    save(merged, os.path.join(args.out, "merged.safetensors"))

    adapted = [k for k in merged if any(f".{t}." in k for t in TARGETS)]
    peft_ulps = max(bf16_ulps(bf16_merged[k], merged[k].to(torch.bfloat16)) for k in adapted)
    moved = max(bf16_ulps(merged[k].to(torch.bfloat16), base[k]) for k in adapted)
    files = sorted(f for f in os.listdir(args.out) if f != "reference.json")
    ref = dict(base_fixture=BASE_FIXTURE, seed=SEED, rank=RANK, alpha=ALPHA, targets=TARGETS,
               torch=torch.__version__, transformers=transformers.__version__,
               peft=peft.__version__, adapted_tensors=len(adapted),
               peft_bf16_merge_max_ulps=peft_ulps, merge_max_ulps_from_base=moved,
               files={f: sha256(os.path.join(args.out, f)) for f in files})
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    total = 0
    for f in files + ["reference.json"]:
        n = os.path.getsize(os.path.join(args.out, f))
        total += n
        print(f"wrote {os.path.join(args.out, f)} ({n} bytes)")
    print(f"{len(adapted)} adapted tensors; the merge moves them up to {moved:.0f} bf16 ulps; "
          f"PEFT's bfloat16 merge lands up to {peft_ulps:.1f} ulps from the exact one")
    if total > MAX_BYTES:
        raise SystemExit(f"the fixture is {total} bytes, over {MAX_BYTES}")


if __name__ == "__main__":
    main()
