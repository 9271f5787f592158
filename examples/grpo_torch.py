"""grpo_torch.py: a PyTorch GRPO trainer whose rollouts come from rlbridge.

A small Llama (transformers' LlamaForCausalLM from a config, random init, no download) is
wrapped in FSDP2 (`fully_shard`), trained with AdamW on a task with a verifiable reward:
the share of generated tokens that fall in the first eighth of the vocabulary. Each step:

    publish(version) -> generate (n samples per prompt) -> reward -> group-normalized
    advantages -> clipped policy-gradient loss on the trainer's own logprobs -> step

The trainer's parameters stay on its GPU: rlbridge.torch registers them once (CUDA IPC or
VMM fds) and each publish makes the bridge copy them straight into the GPU worker's
weights, ordered after the trainer's stream. Per step it prints the version, sync ms,
rollout tokens/s, the mean reward and the mismatch between the logprobs rlbridge returned
and the trainer's own recomputed ones for the same tokens.

Run (one GPU, world 1; the script starts a bridge and a worker of its own):

    python3 examples/grpo_torch.py --rlb build/rlb --steps 40 --check

or under torchrun / rlb launch for an FSDP2 world > 1 (one bridge and worker replica per
node, started by rank 0 of the node; --rollout-tp T gives the replica T ranks on GPUs
0..T-1, all-reducing through NCCL). --check exits 1 unless the reward rose, every sample came
from the version published just before, and (fp32) the logprob mismatch stayed <= 1e-4.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client",
                                "python"))
import rlbridge  # noqa: E402
import rlbridge.torch  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rlb", default=shutil.which("rlb") or "build/rlb", help="the rlb program")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO group)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--clip", type=float, default=0.2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="trainer and worker weights (fp32: logprobs match within 1e-4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--json", help="write the per-step figures here")
    ap.add_argument("--rollout-tp", type=int, default=1,
                    help="TP size of the node's worker replica: TP rank i on GPU i, all-reducing "
                         "through NCCL (one GPU per rank)")
    return ap.parse_args()


def setup_dist():
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), local


def build_model(a):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rope_theta=10000.0,
                      tie_word_embeddings=False, attention_bias=False)
    torch.manual_seed(a.seed)
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    return LlamaForCausalLM(cfg).to(dtype), cfg


def start_services(a, ckpt, sockdir, log):
    """The node's bridge and one GPU worker replica (--rollout-tp ranks, rank i on GPU i; at
    TP 1 on this process's GPU), started by local rank 0."""
    env = dict(os.environ, RLB_SOCKET_DIR=sockdir)
    sock = os.path.join(sockdir, "bridge")
    procs = [subprocess.Popen([a.rlb, "bridge", "--socket", sock, "--model", ckpt, "--mode",
                               "pause"], env=env, stdout=log, stderr=log)]
    while not os.path.exists(sock):
        if procs[0].poll() is not None:
            raise SystemExit("grpo: the bridge exited; see " + log.name)
        time.sleep(0.05)
    T = a.rollout_tp
    for t in range(T):
        gpu = str(t) if T > 1 else os.environ.get("LOCAL_RANK", "0")
        procs.append(subprocess.Popen([a.rlb, "worker", "--bridge", sock, "--model", ckpt,
                                       "--device", "cuda", "--dtype", a.dtype, "--kv-mb", "512",
                                       "--tp-rank", str(t), "--tp-size", str(T), "--gpu", gpu],
                                      env=env, stdout=log, stderr=log))
    with rlbridge.Client(socket=sock, observer=True) as obs:
        t0 = time.monotonic()
        while obs.bridge_stats().get("replicas_up", 0) < 1:
            if any(p.poll() is not None for p in procs[1:]) or time.monotonic() - t0 > 120:
                raise SystemExit("grpo: the worker did not come up; see " + log.name)
            time.sleep(0.1)
    return sock, procs


def token_logprobs(model, seqs, prompt_len):
    """log p(token) under the model for the completion tokens of each sequence."""
    logits = model(input_ids=seqs).logits.float()
    lp = F.log_softmax(logits[:, prompt_len - 1:-1], dim=-1)
    return lp.gather(-1, seqs[:, prompt_len:].unsqueeze(-1)).squeeze(-1)


def main():
    a = parse_args()
    rank, world, local = setup_dist()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, cfg = build_model(a)
    # One private directory for the job (checkpoint, socket, logs), made by rank 0.
    box = [tempfile.mkdtemp(prefix="rlb-grpo-") if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    work = box[0]
    ckpt, sockdir = os.path.join(work, "model"), os.path.join(work, "sock")
    if rank == 0:
        os.chmod(work, 0o700)
        os.makedirs(sockdir, mode=0o700)
    procs = []
    log = open(os.path.join(work, f"services.{rank}.log"), "w")
    try:
        if rank == 0:
            model.save_pretrained(ckpt)  # config.json (+ initial weights) for the bridge
        dist.barrier()
        if local == 0:
            sock, procs = start_services(a, ckpt, sockdir, log)
        dist.barrier()
        sock = os.path.join(sockdir, "bridge")

        from torch.distributed.fsdp import fully_shard
        model = model.cuda()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)

        client = rlbridge.Client(socket=sock, rank=rank, world=world)
        names = rlbridge.torch.register_model(client, model)
        if rank == 0:
            print(f"grpo: {len(names)} tensors registered, world {world}, {a.dtype}",
                  flush=True)
        gen = torch.Generator().manual_seed(a.seed + 1)
        target = a.vocab // 8
        rows, first, last = [], None, None
        for step in range(1, a.steps + 1):
            version = step
            st = rlbridge.torch.publish(client, version)
            prompts = torch.randint(0, a.vocab, (a.prompts, 4), generator=gen).tolist()
            t0 = time.monotonic()
            outs = client.generate(prompts, rlbridge.SamplingParams(
                n=a.group, temperature=1.0, max_tokens=a.max_tokens, logprobs=0,
                seed=a.seed * 100003 + step), timeout_ms=120000)
            gen_s = time.monotonic() - t0
            seqs, old_lp, rewards, stale = [], [], [], 0
            for o in outs:
                for c in o.outputs:
                    toks = list(c.token_ids) + [0] * (a.max_tokens - len(c.token_ids))
                    seqs.append(o.prompt_token_ids + toks)
                    lps = list(c.logprobs) + [0.0] * (a.max_tokens - len(c.logprobs))
                    old_lp.append(lps)
                    rewards.append(sum(t < target for t in c.token_ids) /
                                   max(1, len(c.token_ids)))
                    stale += c.weight_version != version
            n_tok = sum(len(c.token_ids) for o in outs for c in o.outputs)
            seqs = torch.tensor(seqs, device="cuda")
            old_lp = torch.tensor(old_lp, device="cuda")
            r = torch.tensor(rewards, device="cuda").view(a.prompts, a.group)
            adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1, 1)
            new_lp = token_logprobs(model, seqs, 4)
            diff = (new_lp.detach() - old_lp).abs()
            ratio = torch.exp(new_lp - old_lp)
            loss = -torch.min(ratio * adv, ratio.clamp(1 - a.clip, 1 + a.clip) * adv).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            row = {"step": step, "version": version, "sync_ms": st.ms,
                   "rollout_tok_s": n_tok / gen_s, "reward": float(r.mean()),
                   "mismatch_mean": float(diff.mean()), "mismatch_max": float(diff.max()),
                   "stale_samples": stale}
            rows.append(row)
            if rank == 0:
                print("step {step:3d}  version {version:4d}  sync {sync_ms:7.2f} ms  "
                      "rollout {rollout_tok_s:9.0f} tok/s  reward {reward:.3f}  "
                      "mismatch mean {mismatch_mean:.2e} max {mismatch_max:.2e}".format(**row),
                      flush=True)
        k = max(1, len(rows) // 5)
        first = sum(x["reward"] for x in rows[:k]) / k
        last = sum(x["reward"] for x in rows[-k:]) / k
        worst = max(x["mismatch_max"] for x in rows)
        stale = sum(x["stale_samples"] for x in rows)
        if rank == 0:
            print(json.dumps({"example": "grpo_torch", "dtype": a.dtype, "world": world,
                              "reward_first": first, "reward_last": last,
                              "mismatch_max": worst, "stale_samples": stale,
                              "sync_ms_median": sorted(x["sync_ms"] for x in rows)[len(rows) // 2]}),
                  flush=True)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(rows, f)
        client.close()
        ok = last > first + 0.05 and stale == 0 and (a.dtype != "fp32" or worst <= 1e-4)
        if a.check and not ok:
            print(f"grpo: check failed (reward {first:.3f} -> {last:.3f}, stale {stale}, "
                  f"mismatch {worst:.2e})", file=sys.stderr)
            return 1
        return 0
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
        dist.destroy_process_group()
        if rank == 0:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
