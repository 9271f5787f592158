"""rlbridge.torch: PyTorch helpers. Importing this module needs no torch; the functions that
move tensors import it when called.

    import rlbridge, rlbridge.torch
    c = rlbridge.Client(rank=0, world=1)
    rlbridge.torch.register_peft(c, peft_model)     # base + adapter factors, declared
    ... optimizer step ...
    c.publish(v)                                     # only the adapters changed

register_peft serves an unsharded model on the CPU (each parameter moves into shared memory
the bridge reads in place, so the optimizer keeps updating it there). A sharded trainer
(FSDP2 DTensor shards, FSDP1 FlatParameters) registers its local shards with
Client.register_many and the layouts of Client.register, naming them with peft_to_hf and
declaring the adapters with lora_declarations.
"""

from . import RlbError, _lib, peft_to_hf

__all__ = ["lora_declarations", "peft_parameters", "register_peft"]

_ALIGN = 64  # bytes between parameters in the shared block


def lora_declarations(peft_model, adapter_name="default"):
    """The adapters of a PEFT model as Client.register_lora wants them: one dict (target,
    rank, alpha, rslora) per module carrying `adapter_name` (its r and lora_alpha come from
    the module, so rank_pattern / alpha_pattern are honoured)."""
    cfg = getattr(peft_model, "peft_config", {}).get(adapter_name)
    rslora = bool(getattr(cfg, "use_rslora", False))
    out = []
    for name, module in peft_model.named_modules():
        factors = getattr(module, "lora_A", None) or {}
        embed = getattr(module, "lora_embedding_A", None) or {}
        if adapter_name not in factors and adapter_name not in embed:
            continue
        out.append({"target": peft_to_hf(name + ".weight"),
                    "rank": int(module.r[adapter_name]),
                    "alpha": float(module.lora_alpha[adapter_name]),
                    "rslora": rslora})
    return out


def peft_parameters(peft_model, adapter_name="default", base=True):
    """[(HF name, parameter)] of a PEFT model: the adapter's factors and (base=True) every
    other parameter of the model; factors of other adapters are left out."""
    out = []
    for name, param in peft_model.named_parameters():
        try:
            hf = peft_to_hf(name, adapter_name)
        except RlbError as e:
            if e.code == _lib.ENOTFOUND:
                continue
            raise
        if base or ".lora_" in hf:
            out.append((hf, param))
    return out


def register_peft(client, peft_model, adapter_name="default"):
    """Declares the PEFT model's adapters, moves its parameters (frozen base and factors)
    into shared memory of `client` (param.data then points there) and registers them.
    Returns the HF names registered."""
    import torch

    client.register_lora(lora_declarations(peft_model, adapter_name))
    params = peft_parameters(peft_model, adapter_name)
    sizes = [p.numel() * p.element_size() for _, p in params]
    total = sum((n + _ALIGN - 1) // _ALIGN * _ALIGN for n in sizes)
    mem = client.alloc_host(max(total, 1))
    tensors, off = [], 0
    with torch.no_grad():
        for (hf, p), n in zip(params, sizes):
            shared = torch.frombuffer(mem, dtype=p.dtype, count=p.numel(), offset=off)
            shared = shared.view(p.shape)
            shared.copy_(p.detach().cpu())
            p.data = shared
            tensors.append({"name": hf, "data": shared})
            off += (n + _ALIGN - 1) // _ALIGN * _ALIGN
    client.register_many(tensors)
    return [hf for hf, _ in params]
