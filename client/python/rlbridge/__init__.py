"""rlbridge: the Python client of rlbridge, over librlb with ctypes (no required packages).

    import rlbridge
    with rlbridge.Client(rank=0, world=1) as c:
        mem = c.alloc_host(4 * 64)               # shared memory the bridge reads in place
        w = mem.cast("f")                        # or numpy.frombuffer(mem, numpy.float32)
        c.register("model.norm.weight", w, shape=(64,))
        c.publish(1)                             # blocks until synced; raises on abort
        outs = c.generate([[1, 2, 3]], rlbridge.SamplingParams(max_tokens=8, logprobs=0))
        outs[0].outputs[0].token_ids, .logprobs, .finish_reason, .weight_version

Tensors are registered from any object with the buffer protocol (memoryview, array.array,
ctypes arrays, bytearray-backed views) and, when those packages are importable, numpy
arrays and torch tensors; host memory must come from Client.alloc_host (the bridge maps
that memory; nothing is copied), CUDA tensors are exported from wherever they live (see
rlb_register in rlb.h; rlbridge.torch registers whole models and publishes on the current
stream). Errors raise RlbError (code, text); a publish the bridge gave up raises
AbortedError. Importing the package loads librlb.so (rlbridge/_lib.py says where it looks)
and raises LibraryError (an ImportError) when it finds none or one of another ABI;
`python3 -m rlbridge doctor` shows which library it loaded. A Client may be shared by
threads (librlb locks internally; calls release the GIL).
"""

import array
import ctypes
from collections import namedtuple

from . import _lib
from ._lib import LibraryError, lib

__all__ = ["Client", "SamplingParams", "RlbError", "AbortedError", "LibraryError", "SyncStats",
           "RequestOutput", "CompletionOutput", "Ticket", "host_array", "peft_to_hf"]


class RlbError(RuntimeError):
    """A librlb call failed: code is the negative RLB_E* value, text what went wrong."""

    def __init__(self, code, text=""):
        self.code = code
        self.name = lib.rlb_strerror(code).decode()
        self.text = text
        super().__init__(f"{text} [{code}]" if text else f"{self.name} [{code}]")


class AbortedError(RlbError):
    """The bridge gave up a published version (a rank or worker died, a check failed)."""


SyncStats = namedtuple("SyncStats", "version bytes ms gbps")
CompletionOutput = namedtuple("CompletionOutput",
                              "index token_ids logprobs finish_reason weight_version")
RequestOutput = namedtuple("RequestOutput", "prompt_index prompt_token_ids outputs")


class SamplingParams:
    """Sampling parameters with vLLM's names and defaults. logprobs: None (no logprobs) or
    0 (the sampled token's logprob; True is taken as 0). seed None draws a fresh one."""

    def __init__(self, n=1, temperature=1.0, top_p=1.0, top_k=-1, seed=None, max_tokens=16,
                 stop_token_ids=None, logprobs=None):
        self.n = n
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seed = seed
        self.max_tokens = max_tokens
        self.stop_token_ids = list(stop_token_ids or [])
        self.logprobs = logprobs

    def __repr__(self):
        return ("SamplingParams(n={n}, temperature={temperature}, top_p={top_p}, "
                "top_k={top_k}, seed={seed}, max_tokens={max_tokens}, "
                "stop_token_ids={stop_token_ids}, logprobs={logprobs})").format(**vars(self))

    def _to_c(self, keep):
        sp = _lib.SamplingParamsC()
        lib.rlb_sampling_params_init(ctypes.byref(sp))
        sp.n = self.n
        sp.temperature = self.temperature
        sp.top_p = self.top_p
        sp.top_k = self.top_k
        sp.seed = -1 if self.seed is None else self.seed
        sp.max_tokens = self.max_tokens
        if self.stop_token_ids:
            stop = (_lib.c_i32 * len(self.stop_token_ids))(*self.stop_token_ids)
            keep.append(stop)
            sp.stop_token_ids = stop
            sp.n_stop_token_ids = len(self.stop_token_ids)
        if self.logprobs is None or self.logprobs is False:
            sp.logprobs = -1
        else:
            sp.logprobs = 0 if self.logprobs is True else int(self.logprobs)
        return sp


class Ticket:
    """A submitted generate request; Client.poll / Client.wait collect it."""

    def __init__(self, value, prompts):
        self.value = value
        self.prompts = prompts  # the prompt token lists, for RequestOutput


# ---- buffers ---------------------------------------------------------------------------

_FORMAT_DTYPES = {"f": _lib.DTYPE_F32, "e": _lib.DTYPE_F16}
_NAME_DTYPES = {"float32": _lib.DTYPE_F32, "float16": _lib.DTYPE_F16,
                "bfloat16": _lib.DTYPE_BF16, "torch.float32": _lib.DTYPE_F32,
                "torch.float16": _lib.DTYPE_F16, "torch.bfloat16": _lib.DTYPE_BF16}
_DTYPE_NAMES = {"f32": _lib.DTYPE_F32, "float32": _lib.DTYPE_F32, "f16": _lib.DTYPE_F16,
                "float16": _lib.DTYPE_F16, "bf16": _lib.DTYPE_BF16,
                "bfloat16": _lib.DTYPE_BF16}


def _buffer_info(data):
    """(address, bytes, dtype or None, shape or None, CUDA device index or None) of a
    contiguous buffer."""
    mod = type(data).__module__.split(".")[0]
    if mod == "torch":
        if data.device.type not in ("cpu", "cuda"):
            raise RlbError(_lib.EINVAL, f"torch tensors on {data.device.type} are not "
                                        "supported (cpu or cuda)")
        if not data.is_contiguous():
            raise RlbError(_lib.EINVAL, "the torch tensor is not contiguous")
        return (data.data_ptr(), data.numel() * data.element_size(),
                _NAME_DTYPES.get(str(data.dtype)), tuple(data.shape),
                data.device.index if data.device.type == "cuda" else None)
    if mod == "numpy":
        if not data.flags["C_CONTIGUOUS"]:
            raise RlbError(_lib.EINVAL, "numpy arrays must be C-contiguous")
        return (data.ctypes.data, data.nbytes, _NAME_DTYPES.get(str(data.dtype)),
                tuple(data.shape), None)
    if isinstance(data, ctypes.Array):
        return ctypes.addressof(data), ctypes.sizeof(data), None, None, None
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise RlbError(_lib.EINVAL, "buffers must be C-contiguous")
    if mv.readonly:
        raise RlbError(_lib.EINVAL, "the buffer is read-only; pass a view of alloc_host memory")
    byte_view = mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv
    addr = ctypes.addressof(ctypes.c_char.from_buffer(byte_view)) if mv.nbytes else 0
    shape = tuple(mv.shape) if mv.ndim else None
    return addr, mv.nbytes, _FORMAT_DTYPES.get(mv.format.lstrip("@=<")), shape, None


_PyMemoryView_FromMemory = ctypes.pythonapi.PyMemoryView_FromMemory
_PyMemoryView_FromMemory.restype = ctypes.py_object
_PyMemoryView_FromMemory.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
_PyBUF_WRITE = 0x200


def _memory_view(addr, nbytes):
    """A writable memoryview of bytes over memory librlb owns."""
    return _PyMemoryView_FromMemory(addr, nbytes, _PyBUF_WRITE)


def _dtype_code(dtype):
    if isinstance(dtype, int):
        return dtype
    code = _DTYPE_NAMES.get(str(dtype).replace("torch.", ""))
    if code is None:
        raise RlbError(_lib.EINVAL, f"unknown dtype {dtype!r}: use float32, float16 or bfloat16")
    return code


def peft_to_hf(name, adapter=None):
    """The HF name rlbridge uses for a PEFT parameter name (librlb's rlb_peft_to_hf):
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" ->
    "model.layers.0.self_attn.q_proj.lora_A.weight". adapter: the PEFT adapter wanted
    (None: any); a factor of another adapter raises RlbError with code ENOTFOUND."""
    out = ctypes.create_string_buffer(1024)
    rc = lib.rlb_peft_to_hf(name.encode(), adapter.encode() if adapter else None, out,
                            len(out))
    if rc < 0:
        raise RlbError(rc, lib.rlb_last_error(None).decode(errors="replace"))
    return out.value.decode()


# ---- the client ------------------------------------------------------------------------


class Client:
    """A connection to the node's rlb-bridge (rlb_connect). socket: a path, or a name in
    the socket directory (None = the default). observer=True connects as a tool (generate
    and stats only)."""

    def __init__(self, socket=None, rank=0, world=1, observer=False, connect_timeout_ms=0,
                 request_timeout_ms=0):
        self._c = None
        self._host = {}  # address -> memoryview of each alloc_host allocation
        opts = _lib.ClientOptions()
        lib.rlb_client_options_init(ctypes.byref(opts))
        self._socket = socket.encode() if isinstance(socket, str) else socket
        opts.socket = self._socket
        opts.rank = rank
        opts.world = world
        opts.observer = 1 if observer else 0
        opts.connect_timeout_ms = connect_timeout_ms
        opts.request_timeout_ms = request_timeout_ms
        handle = ctypes.c_void_p()
        rc = lib.rlb_connect(ctypes.byref(opts), ctypes.byref(handle))
        if rc < 0:
            raise RlbError(rc, lib.rlb_last_error(None).decode(errors="replace"))
        self._c = handle

    # -- lifetime

    def close(self):
        """Closes the connection; alloc_host memory becomes invalid."""
        if self._c:
            lib.rlb_close(self._c)
            self._c = None
            self._host.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def _check(self, rc, cls=RlbError):
        if rc < 0:
            raise cls(rc, lib.rlb_last_error(self._c).decode(errors="replace"))
        return rc

    def _handle(self):
        if not self._c:
            raise RlbError(_lib.EINVAL, "the client is closed")
        return self._c

    # -- memory

    def alloc_host(self, nbytes):
        """Zeroed shared memory of nbytes, as a writable memoryview of bytes (format "B"):
        view it as anything with .cast("f"), numpy.frombuffer(...), torch.frombuffer(...).
        It stays valid until free_host or close."""
        ptr = ctypes.c_void_p()
        self._check(lib.rlb_alloc_host(self._handle(), nbytes, ctypes.byref(ptr)))
        mv = _memory_view(ptr.value, nbytes)
        self._host[ptr.value] = mv
        return mv

    def free_host(self, buf):
        """Frees memory from alloc_host (its tensors must be unregistered first)."""
        addr = _buffer_info(buf)[0]
        self._check(lib.rlb_free_host(self._handle(), ctypes.c_void_p(addr)))
        self._host.pop(addr, None)

    # -- registration

    def _desc(self, name, data, shape=None, dtype=None, layout="full", shard_rank=0,
              shard_world=1, unit=0, align=0, entries=None, keep=None):
        try:
            # data None: an FSDP2 rank that holds no rows of this tensor
            info = _buffer_info(data) if data is not None else (0, 0, None, None, None)
        except RlbError as e:
            raise RlbError(e.code, f"tensor {name!r}: {e.text}") from None
        addr, _nbytes, buf_dtype, buf_shape, cuda_device = info
        d = _lib.TensorDesc()
        lib.rlb_tensor_desc_init(ctypes.byref(d))
        keep.append(name.encode())
        d.name = keep[-1]
        code = _dtype_code(dtype) if dtype is not None else buf_dtype
        if code is None:
            raise RlbError(_lib.EINVAL, f"tensor {name!r}: give dtype= (the buffer's format "
                                        "does not say)")
        d.dtype = code
        shape = tuple(shape if shape is not None else (buf_shape or ()))
        if layout not in _lib.LAYOUTS:
            raise RlbError(_lib.EINVAL, f"layout {layout!r}: one of {sorted(_lib.LAYOUTS)}")
        if not shape or len(shape) > _lib.MAX_DIMS:
            raise RlbError(_lib.EINVAL, f"tensor {name!r}: give its global shape=")
        d.ndim = len(shape)
        for i, s in enumerate(shape):
            d.shape[i] = s
        d.layout = _lib.LAYOUTS[layout]
        d.shard_rank = shard_rank
        d.shard_world = shard_world
        d.unit = unit
        d.align = align
        if entries:
            arr = (_lib.Fsdp1Entry * len(entries))()
            for i, e in enumerate(entries):
                e_name, e_shape, e_numel = e.get("name"), e.get("shape", ()), e["numel"]
                if e_name is not None:
                    keep.append(e_name.encode())
                    arr[i].name = keep[-1]
                arr[i].ndim = len(e_shape)
                for k, s in enumerate(e_shape):
                    arr[i].shape[k] = s
                arr[i].numel = e_numel
                arr[i].padding = 1 if e_name is None else 0
            keep.append(arr)
            d.entries = arr
            d.n_entries = len(entries)
        need = ctypes.c_uint64()
        rc = lib.rlb_tensor_bytes(ctypes.byref(d), ctypes.byref(need))
        if rc < 0:
            raise RlbError(rc, lib.rlb_last_error(None).decode(errors="replace"))
        if _nbytes < need.value:
            raise RlbError(_lib.EINVAL, f"tensor {name!r}: the buffer holds {_nbytes} bytes, "
                                        f"the layout needs {need.value}")
        d.data = addr
        if cuda_device is not None:
            d.device = _lib.DEVICE_CUDA
            d.cuda_device = cuda_device
        return d

    def register(self, name, data, **kw):
        """Registers one tensor. data: a buffer inside alloc_host memory, or a CUDA torch
        tensor, holding this rank's bytes (contiguous). Keywords: shape (GLOBAL shape; default the buffer's), dtype ("float32",
        "float16", "bfloat16"; default the buffer's), layout ("full", "fsdp1", "fsdp2"),
        shard_rank, shard_world, unit, align, entries (FSDP1: list of dicts with name (None
        for padding), shape, numel)."""
        self.register_many([dict(kw, name=name, data=data)])

    def register_many(self, tensors):
        """Registers a batch: a list of dicts with register()'s arguments."""
        keep = []
        descs = [self._desc(keep=keep, **t) for t in tensors]
        arr = (_lib.TensorDesc * len(descs))(*descs)
        self._check(lib.rlb_register(self._handle(), arr, len(descs)))

    def unregister(self, *names):
        """Forgets the named tensors (no names: all of them)."""
        enc = [n.encode() for n in names]
        arr = (ctypes.c_char_p * max(1, len(enc)))(*enc)
        self._check(lib.rlb_unregister(self._handle(), arr, len(enc)))

    # -- LoRA adapters

    def register_lora(self, adapters):
        """Declares LoRA adapters (DESIGN §10): an iterable of dicts with target (the adapted
        weight's HF or PEFT name), rank, alpha and optionally rslora (True: scale alpha /
        sqrt(rank)). Declare before registering the factors "<module>.lora_A.weight" and
        "<module>.lora_B.weight"; every sync then writes base + scale * B * A."""
        adapters = list(adapters)
        keep = []
        arr = (_lib.LoraDesc * max(1, len(adapters)))()
        for d, a in zip(arr, adapters):
            lib.rlb_lora_desc_init(ctypes.byref(d))
            keep.append(a["target"].encode())
            d.target = keep[-1]
            d.rank = a["rank"]
            d.alpha = a["alpha"]
            d.rslora = 1 if a.get("rslora") else 0
        self._check(lib.rlb_register_lora(self._handle(), arr, len(adapters)))

    def unregister_lora(self, *targets):
        """Takes back this client's adapter declarations (no targets: all of them); the
        next version is the base again."""
        enc = [t.encode() for t in targets]
        arr = (ctypes.c_char_p * max(1, len(enc)))(*enc)
        self._check(lib.rlb_unregister_lora(self._handle(), arr, len(enc)))

    # -- sync

    def publish(self, version, stream=None):
        """Says this rank's tensors hold `version`; blocks until the bridge committed it.
        stream: for CUDA tensors, the CUDA stream (its integer handle, e.g.
        torch.cuda.current_stream().cuda_stream) whose work wrote them; None = the legacy
        default stream. Returns SyncStats; raises AbortedError when the version was given
        up."""
        st = _lib.SyncStats()
        st.struct_size = ctypes.sizeof(st)
        rc = lib.rlb_publish_stream(self._handle(), version, ctypes.c_void_p(stream or None),
                                    ctypes.byref(st))
        self._check(rc, AbortedError if rc == _lib.EABORTED else RlbError)
        return SyncStats(st.version, st.bytes, st.ms, st.gbps)

    @property
    def weight_version(self):
        """Newest committed weight version the bridge reported (0 = none)."""
        return lib.rlb_weight_version(self._handle())

    # -- sleep / wake (vLLM's names)

    def sleep(self):
        """Workers free their KV cache (weights stay); generation is refused until
        wake_up()."""
        self._check(lib.rlb_sleep(self._handle()))

    def wake_up(self):
        """Workers restore their KV cache."""
        self._check(lib.rlb_wake(self._handle()))

    # -- generation

    def submit(self, prompts, sampling_params=None, min_weight_version=0):
        """Sends a generate request without waiting; returns a Ticket."""
        keep = []
        prompts = [list(p) for p in prompts]
        if not prompts:
            raise RlbError(_lib.EINVAL, "generate needs at least one prompt")
        arr = (_lib.Prompt * len(prompts))()
        for i, p in enumerate(prompts):
            toks = (_lib.c_i32 * max(1, len(p)))(*p)
            keep.append(toks)
            arr[i].tokens = toks
            arr[i].n_tokens = len(p)
        req = _lib.GenerateRequest()
        lib.rlb_generate_request_init(ctypes.byref(req))
        req.prompts = arr
        req.n_prompts = len(prompts)
        sp = (sampling_params or SamplingParams())._to_c(keep)
        req.sampling = ctypes.pointer(sp)
        req.min_weight_version = min_weight_version
        t = ctypes.c_uint64()
        self._check(lib.rlb_generate_submit(self._handle(), ctypes.byref(req), ctypes.byref(t)))
        return Ticket(t.value, prompts)

    def _collect(self, ticket, res):
        try:
            n = lib.rlb_result_num_samples(res)
            out = [RequestOutput(i, p, []) for i, p in enumerate(ticket.prompts)]
            for k in range(n):
                s = lib.rlb_result_sample(res, k).contents
                toks = s.tokens[:s.n_tokens] if s.n_tokens else []
                lps = (s.logprobs[:s.n_tokens] if s.n_tokens else []) if s.logprobs else None
                out[s.prompt].outputs.append(CompletionOutput(
                    s.index, toks, lps, _lib.FINISH_REASONS.get(s.finish, "?"),
                    s.weight_version))
            return out
        finally:
            lib.rlb_result_free(res)

    def poll(self, ticket):
        """The request's outputs (list of RequestOutput) if complete, else None."""
        res = ctypes.c_void_p()
        rc = lib.rlb_generate_poll(self._handle(), ticket.value, ctypes.byref(res))
        if rc == _lib.EAGAIN:
            return None
        self._check(rc)
        return self._collect(ticket, res)

    def wait(self, ticket, timeout_ms=-1):
        """Blocks until the request completes (timeout_ms < 0: no bound); returns its list
        of RequestOutput. Raises RlbError(ETIMEDOUT) and keeps the ticket on timeout."""
        res = ctypes.c_void_p()
        self._check(lib.rlb_generate_wait(self._handle(), ticket.value, timeout_ms,
                                          ctypes.byref(res)))
        return self._collect(ticket, res)

    def generate(self, prompts, sampling_params=None, min_weight_version=0, timeout_ms=-1):
        """Samples completions of prompts (lists of int token ids); returns one
        RequestOutput per prompt, with sampling_params.n CompletionOutputs each."""
        return self.wait(self.submit(prompts, sampling_params, min_weight_version), timeout_ms)

    # -- stats

    def stats(self):
        """This client's counters (dict)."""
        st = _lib.ClientStats()
        st.struct_size = ctypes.sizeof(st)
        self._check(lib.rlb_client_stats_get(self._handle(), ctypes.byref(st)))
        return {name: getattr(st, name) for name, _ in _lib.ClientStats._fields_[1:]}

    def bridge_stats(self):
        """The bridge's counters (dict name -> float), one round trip."""
        lst = ctypes.c_void_p()
        self._check(lib.rlb_bridge_stats(self._handle(), ctypes.byref(lst)))
        try:
            out = {}
            for i in range(lib.rlb_stat_list_size(lst)):
                name, value = ctypes.c_char_p(), ctypes.c_double()
                lib.rlb_stat_list_get(lst, i, ctypes.byref(name), ctypes.byref(value))
                out[name.value.decode()] = value.value
            return out
        finally:
            lib.rlb_stat_list_free(lst)


def host_array(client, typecode, count):
    """A memoryview of `count` elements of `typecode` ('f' float32, 'e' float16) in fresh
    alloc_host memory: the simplest storage for registered weights without numpy."""
    return client.alloc_host(array.array(typecode).itemsize * count).cast(typecode)
