"""rlbridge.torch: registering a PyTorch model's parameters and publishing them.

    import rlbridge, rlbridge.torch
    c = rlbridge.Client(rank=rank, world=world)
    names = rlbridge.torch.register_model(c, model)  # plain, FSDP2 (fully_shard) or FSDP1
    ...                                               # each step, after optimizer.step():
    rlbridge.torch.publish(c, version)                # on torch.cuda.current_stream()

Parameters stay where they are: CUDA tensors are exported (CUDA IPC handle or VMM fds, or
host staging where the container forbids CUDA IPC), CPU tensors must live in
Client.alloc_host memory. What each rank registers follows DESIGN §4:
  - a plain module: every parameter whole (layout "full");
  - FSDP2 (fully_shard): each DTensor sharded Shard(0) over the mesh dimension that shards
    it; the rank registers its local rows (to_local()), with shard rank and world from the
    device mesh (layout "fsdp2"); replicated DTensors are registered whole;
  - FSDP1: each FlatParameter with its own metadata (_fqns, _shapes, _numels_with_padding,
    _is_padding_mask), this rank's 1/world chunk (layout "fsdp1").
Names are the Hugging Face ones: wrapper components that FSDP, torch.compile and
activation checkpointing insert (`_fsdp_wrapped_module`, `_orig_mod`,
`_checkpoint_wrapped_module`) are dropped.

LoRA (PEFT): register_peft registers an unsharded CPU PeftModel's base and adapter factors
(moved into shared memory the bridge reads in place) and declares the adapters; a sharded
trainer registers its local shards with Client.register_many, naming them with peft_to_hf
and declaring the adapters with lora_declarations.

torch is imported inside the functions that need it, so the name mapping and the layout
computation import (and are tested) without torch.
"""

from . import RlbError, _lib, peft_to_hf

__all__ = ["hf_name", "model_tensors", "register", "register_model", "publish",
           "lora_declarations", "peft_parameters", "register_peft"]

WRAPPER_COMPONENTS = ("_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module")
_DTYPES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16",
           "torch.float16": "float16"}


def hf_name(name):
    """The parameter name without the components wrappers add:
    "_orig_mod.model._fsdp_wrapped_module.layers.0.mlp.up_proj.weight" ->
    "model.layers.0.mlp.up_proj.weight"."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_COMPONENTS)


def _dtype(t, name):
    dt = _DTYPES.get(str(t.dtype))
    if dt is None:
        raise RlbError(_lib.EDTYPE, f"parameter {name!r}: dtype {t.dtype} (rlbridge takes "
                                    "float32, bfloat16 or float16)")
    return dt


def _check_contiguous(t, name):
    if not t.is_contiguous():
        raise RlbError(_lib.EINVAL, f"parameter {name!r} is not contiguous (shape "
                                    f"{tuple(t.shape)}, strides {tuple(t.stride())}): "
                                    "make it contiguous before registering")


def _is_shard0(placement):
    is_shard = getattr(placement, "is_shard", None)
    if callable(is_shard):
        return is_shard(0)
    return type(placement).__name__ == "Shard" and getattr(placement, "dim", None) == 0


def _is_replicate(placement):
    is_replicate = getattr(placement, "is_replicate", None)
    if callable(is_replicate):
        return is_replicate()
    return type(placement).__name__ == "Replicate"


def _dtensor_entry(name, p):
    """One DTensor parameter (FSDP2): Shard(0) on one mesh dimension, Replicate on the
    others (HSDP), or Replicate everywhere."""
    placements = tuple(p.placements)
    shard_dims = [i for i, pl in enumerate(placements) if _is_shard0(pl)]
    others = [pl for i, pl in enumerate(placements) if i not in shard_dims]
    if len(shard_dims) > 1 or not all(_is_replicate(pl) for pl in others):
        raise RlbError(_lib.EUNSUPPORTED, f"parameter {name!r}: placements {placements} "
                                          "(rlbridge takes Shard(0), with Replicate on other "
                                          "mesh dimensions)")
    local = p.to_local()
    _check_contiguous(local, name)
    entry = dict(name=name, data=local if local.numel() else None, shape=tuple(p.shape),
                 dtype=_dtype(local, name))
    if shard_dims:
        mesh, dim = p.device_mesh, shard_dims[0]
        entry.update(layout="fsdp2", shard_rank=mesh.get_local_rank(mesh_dim=dim),
                     shard_world=mesh.size(dim))
    return entry


def _fsdp1_handles(model):
    """(module path, FlatParamHandle) of every FSDP1 unit, in module order."""
    out = []
    for path, m in model.named_modules():
        h = getattr(m, "_handle", None)
        if h is not None and getattr(h, "flat_param", None) is not None:
            out.append((path, h))
    return out


def fsdp1_entry(prefix, unit, handle):
    """The register() arguments of one FSDP1 FlatParameter: its local chunk and its own
    metadata merged into entries in flat order (names under prefix, the FSDP module's
    path); the padding that rounds the total to a multiple of the world is left to the
    library."""
    fp = handle.flat_param
    fqns, shapes = list(fp._fqns), list(fp._shapes)
    entries, k = [], 0
    for numel, pad in zip(fp._numels_with_padding, fp._is_padding_mask):
        if pad:
            entries.append(dict(name=None, numel=int(numel)))
            continue
        full = hf_name(f"{prefix}.{fqns[k]}" if prefix else fqns[k])
        entries.append(dict(name=full, shape=tuple(int(s) for s in shapes[k]),
                            numel=int(numel)))
        k += 1
    world = int(handle.world_size)
    total = sum(e["numel"] for e in entries)
    total = (total + world - 1) // world * world
    name = hf_name(f"{prefix}._flat_param" if prefix else "_flat_param")
    _check_contiguous(fp, name)
    return dict(name=name, data=fp, shape=(total,), dtype=_dtype(fp, name), layout="fsdp1",
                shard_rank=int(handle.rank), shard_world=world, unit=unit, entries=entries)


def model_tensors(model):
    """The register_many() argument list of a model: FSDP1 units when the model has any
    (and the parameters outside them), else every named parameter, whole or as its
    FSDP2 shard."""
    handles = _fsdp1_handles(model)
    owned = set()
    out = []
    for unit, (prefix, h) in enumerate(handles):
        out.append(fsdp1_entry(prefix, unit, h))
        owned.add(id(h.flat_param))
    for name, p in model.named_parameters():
        if id(p) in owned or getattr(p, "_fqns", None) is not None:
            continue  # a FlatParameter, or (use_orig_params) a view into one
        if handles and any(name.startswith(f"{pre}.") or not pre for pre, _ in handles):
            continue
        hf = hf_name(name)
        if hasattr(p, "placements") and hasattr(p, "to_local"):
            out.append(_dtensor_entry(hf, p))
            continue
        t = p.detach()
        _check_contiguous(t, hf)
        out.append(dict(name=hf, data=t, shape=tuple(t.shape), dtype=_dtype(t, hf)))
    return out


def register(client, name, tensor, **kw):
    """Registers one torch tensor (CUDA, or CPU inside alloc_host memory) under name;
    shape and dtype default to the tensor's. Keywords as Client.register."""
    t = tensor.detach()
    _check_contiguous(t, name)
    kw.setdefault("shape", tuple(t.shape))
    kw.setdefault("dtype", _dtype(t, name))
    client.register(name, t, **kw)


def register_model(client, model):
    """Registers every parameter of model on this rank in one batch; returns the names."""
    tensors = model_tensors(model)
    client.register_many([dict(t) for t in tensors])
    return [t["name"] for t in tensors]


def publish(client, version):
    """Publishes version once the work queued so far on torch.cuda.current_stream() has
    written the weights: the bridge waits on an event recorded there (the host does not
    synchronize the GPU). Returns rlbridge.SyncStats."""
    import torch

    stream = torch.cuda.current_stream().cuda_stream if torch.cuda.is_available() else None
    return client.publish(version, stream=stream)

# ---- LoRA (PEFT) ---------------------------------------------------------------------


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
