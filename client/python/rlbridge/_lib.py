"""ctypes bindings of librlb (include/rlb/rlb.h): the structs, mirrored field by field, and
the function signatures. Nothing here is public; rlbridge/__init__.py builds the Python API
on top.

The library is librlb.so.<ABI_VERSION>, found in this order: at $RLBRIDGE_LIB (a path, the
only place looked at when it is set); in a build tree beside this package when it runs from
the source checkout (build*/); next to the `rlb` found on PATH (the build tree's directory,
or the lib/ of the prefix it was installed into); in the lib/ of this Python's prefix (a
virtual environment librlb was installed into); then through the system's loader path. A
library of another ABI is refused with LibraryError (code EVERSION) naming both versions.
"""

import ctypes
import ctypes.util
import glob
import os
import shutil
import sys

c_size_t = ctypes.c_size_t
c_u32 = ctypes.c_uint32
c_u64 = ctypes.c_uint64
c_i32 = ctypes.c_int32
c_i64 = ctypes.c_int64
c_int = ctypes.c_int

MAX_DIMS = 8

# Error codes (rlb.h), for the exception classes.
EINVAL, ENOMEM, EIO, ETIMEDOUT, EPEERDEAD, EAGAIN, EPROTO, EVERSION = range(-1, -9, -1)
EPERM, ENOTFOUND, EEXIST, ETOOBIG, ESHAPE, EDTYPE, EUNSUPPORTED = range(-9, -16, -1)
ESTALE, EABORTED, ECUDA, ESHUTDOWN, ECORRUPT, ENONFINITE, ENOREPLICA = range(-16, -23, -1)
ENOTREADY = -23

DTYPE_F32, DTYPE_BF16, DTYPE_F16 = 0, 1, 2
DEVICE_CPU, DEVICE_CUDA = 1, 2
LAYOUTS = {"full": 0, "fsdp1": 1, "fsdp2": 2}
FINISH_REASONS = {0: "stop", 1: "length", 2: "abort"}


class ClientOptions(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("socket", ctypes.c_char_p),
                ("connect_timeout_ms", c_int), ("request_timeout_ms", c_int),
                ("rank", c_u32), ("world", c_u32), ("observer", c_int)]


class Fsdp1Entry(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("ndim", c_u32), ("shape", c_u64 * MAX_DIMS),
                ("numel", c_u64), ("padding", c_int)]


class TensorDesc(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("name", ctypes.c_char_p), ("dtype", c_int),
                ("ndim", c_u32), ("shape", c_u64 * MAX_DIMS), ("layout", c_int),
                ("shard_rank", c_u32), ("shard_world", c_u32), ("unit", c_u32),
                ("align", c_u32), ("n_entries", c_u32),
                ("entries", ctypes.POINTER(Fsdp1Entry)), ("data", ctypes.c_void_p),
                ("device", c_int), ("cuda_device", c_int)]


class LoraDesc(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("target", ctypes.c_char_p), ("rank", c_u32),
                ("alpha", ctypes.c_float), ("rslora", c_int)]


class SyncStats(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("version", c_u64), ("bytes", c_u64),
                ("ms", ctypes.c_double), ("gbps", ctypes.c_double)]


class SamplingParamsC(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("n", c_u32), ("temperature", ctypes.c_float),
                ("top_p", ctypes.c_float), ("top_k", c_i32), ("seed", c_i64),
                ("max_tokens", c_u32), ("stop_token_ids", ctypes.POINTER(c_i32)),
                ("n_stop_token_ids", c_u32), ("logprobs", c_i32)]


class Prompt(ctypes.Structure):
    _fields_ = [("tokens", ctypes.POINTER(c_i32)), ("n_tokens", c_u32)]


class GenerateRequest(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("prompts", ctypes.POINTER(Prompt)),
                ("n_prompts", c_u32), ("sampling", ctypes.POINTER(SamplingParamsC)),
                ("min_weight_version", c_u64)]


class Sample(ctypes.Structure):
    _fields_ = [("prompt", c_u32), ("index", c_u32), ("tokens", ctypes.POINTER(c_i32)),
                ("n_tokens", c_u32), ("logprobs", ctypes.POINTER(ctypes.c_float)),
                ("finish", c_int), ("weight_version", c_u64)]


class ClientStats(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("weight_version", c_u64), ("publishes", c_u64),
                ("synced", c_u64), ("aborted", c_u64), ("bytes_synced", c_u64),
                ("sync_ms", ctypes.c_double), ("requests", c_u64), ("samples", c_u64),
                ("tokens", c_u64), ("host_bytes", c_u64), ("tensors", c_u64)]


ABI_VERSION = 1  # RLB_ABI_VERSION of the include/rlb/rlb.h these bindings mirror
SONAME = f"librlb.so.{ABI_VERSION}"


class LibraryError(ImportError):
    """librlb.so could not be loaded, or is of another ABI (code EVERSION)."""

    def __init__(self, code, text):
        self.code = code
        self.text = text
        super().__init__(f"{text} [{code}]")


def _prefix_libs(prefix):
    """The librlb of the ABI in the library folders of an install prefix."""
    return sorted(glob.glob(os.path.join(prefix, "lib*", SONAME)) +
                  glob.glob(os.path.join(prefix, "lib", "*-linux-gnu", SONAME)))


def _candidates():
    """(path, where it was found) in the order of the module's docstring, and a sentence
    naming every place looked at."""
    env = os.environ.get("RLBRIDGE_LIB")  # a knob of common/env.h, read here by name
    if env:
        return [(env, "from RLBRIDGE_LIB")], f"RLBRIDGE_LIB ({env})"
    found, looked = [], []
    pkg = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.abspath(os.path.join(pkg, "..", "..", ".."))
    if os.path.isfile(os.path.join(checkout, "include", "rlb", "rlb.h")):
        found += [(p, "in the build tree") for p in
                  sorted(glob.glob(os.path.join(checkout, "build*", SONAME)))]
        looked.append(f"{checkout}/build*")
    rlb = shutil.which("rlb")
    if rlb:
        bindir = os.path.dirname(os.path.realpath(rlb))
        found += [(p, f"next to {rlb}") for p in
                  [os.path.join(bindir, SONAME)] + _prefix_libs(os.path.dirname(bindir))
                  if os.path.isfile(p)]
        looked.append(f"next to {rlb}")
    else:
        looked.append("next to rlb on PATH (there is none)")
    found += [(p, f"in {sys.prefix}") for p in _prefix_libs(sys.prefix)]
    looked.append(f"in {sys.prefix}/lib")
    found.append((SONAME, "through the system's loader path"))
    other = ctypes.util.find_library("rlb")
    if other and other != SONAME:
        found.append((other, "through the system's loader path"))
    looked.append("the system's loader path")
    return found, ", ".join(looked)


def _loaded_path(lib, name):
    """The file the dynamic loader mapped for lib (dladdr), else name."""

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    info = DlInfo()
    addr = ctypes.cast(lib.rlb_abi_version, ctypes.c_void_p)
    try:
        if ctypes.CDLL(None).dladdr(addr, ctypes.byref(info)) and info.dli_fname:
            return os.path.realpath(info.dli_fname.decode())
    except (AttributeError, OSError):
        pass
    return name


def _load():
    """Loads and checks librlb; returns (CDLL, path, where). Raises LibraryError."""
    candidates, looked = _candidates()
    failed = ""  # why a library that is there did not load (a missing dependency, say)
    for path, where in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            if os.path.exists(path):
                failed += f" ({e})"
            continue
        if not hasattr(lib, "rlb_abi_version"):
            raise LibraryError(EVERSION, f"rlbridge: {path} ({where}) is a librlb older than "
                               f"ABI version {ABI_VERSION} (it has no rlb_abi_version), and "
                               f"this package speaks ABI version {ABI_VERSION}")
        lib.rlb_abi_version.restype = c_u32
        lib.rlb_abi_version.argtypes = []
        abi = lib.rlb_abi_version()
        path = _loaded_path(lib, path)
        if abi != ABI_VERSION:
            raise LibraryError(EVERSION, f"rlbridge: {path} ({where}) is librlb of ABI version "
                               f"{abi}, and this package speaks ABI version {ABI_VERSION}: "
                               f"install the library and the package of one release, or set "
                               f"RLBRIDGE_LIB to a {SONAME}")
        return lib, path, where
    raise LibraryError(ENOTFOUND, f"rlbridge: cannot load {SONAME}; looked at {looked}{failed}: "
                       f"install rlbridge (cmake --install) or set RLBRIDGE_LIB to the library")


def _bind(lib):
    P = ctypes.POINTER
    vp = ctypes.c_void_p
    sigs = {
        "rlb_strerror": (ctypes.c_char_p, [c_int]),
        "rlb_version": (ctypes.c_char_p, []),
        "rlb_client_options_init": (None, [P(ClientOptions)]),
        "rlb_connect": (c_int, [P(ClientOptions), P(vp)]),
        "rlb_close": (None, [vp]),
        "rlb_last_error": (ctypes.c_char_p, [vp]),
        "rlb_alloc_host": (c_int, [vp, c_size_t, P(vp)]),
        "rlb_free_host": (c_int, [vp, vp]),
        "rlb_tensor_desc_init": (None, [P(TensorDesc)]),
        "rlb_tensor_bytes": (c_int, [P(TensorDesc), P(c_u64)]),
        "rlb_register": (c_int, [vp, P(TensorDesc), c_size_t]),
        "rlb_unregister": (c_int, [vp, P(ctypes.c_char_p), c_size_t]),
        "rlb_lora_desc_init": (None, [P(LoraDesc)]),
        "rlb_register_lora": (c_int, [vp, P(LoraDesc), c_size_t]),
        "rlb_unregister_lora": (c_int, [vp, P(ctypes.c_char_p), c_size_t]),
        "rlb_peft_to_hf": (c_int, [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                   c_size_t]),
        "rlb_publish": (c_int, [vp, c_u64, P(SyncStats)]),
        "rlb_publish_stream": (c_int, [vp, c_u64, vp, P(SyncStats)]),
        "rlb_weight_version": (c_u64, [vp]),
        "rlb_sleep": (c_int, [vp]),
        "rlb_wake": (c_int, [vp]),
        "rlb_sampling_params_init": (None, [P(SamplingParamsC)]),
        "rlb_generate_request_init": (None, [P(GenerateRequest)]),
        "rlb_result_num_samples": (c_size_t, [vp]),
        "rlb_result_sample": (P(Sample), [vp, c_size_t]),
        "rlb_result_free": (None, [vp]),
        "rlb_generate_submit": (c_int, [vp, P(GenerateRequest), P(c_u64)]),
        "rlb_generate_poll": (c_int, [vp, c_u64, P(vp)]),
        "rlb_generate_wait": (c_int, [vp, c_u64, c_int, P(vp)]),
        "rlb_client_stats_get": (c_int, [vp, P(ClientStats)]),
        "rlb_bridge_stats": (c_int, [vp, P(vp)]),
        "rlb_stat_list_size": (c_size_t, [vp]),
        "rlb_stat_list_get": (c_int, [vp, c_size_t, P(ctypes.c_char_p), P(ctypes.c_double)]),
        "rlb_stat_list_free": (None, [vp]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    return lib


lib, path, found_where = _load()
_bind(lib)
