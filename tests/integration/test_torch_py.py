"""test_torch_py: the parts of rlbridge.torch that need no torch (run with plain python3).

Name mapping through wrapper components, and the register() arguments model_tensors()
computes for a plain module, an FSDP2 module (DTensor Shard(0), HSDP, a rank without rows)
and an FSDP1 module (FlatParameter metadata with alignment padding), all from fake objects
shaped like PyTorch's; refusals name the parameter. The GPU side (torch CUDA tensors
through librlb) is tests/gpu/test_client_cuda.
"""

import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "client", "python"))
import rlbridge  # noqa: E402
import rlbridge.torch as rt  # noqa: E402


class FakeTensor:
    def __init__(self, shape, dtype="torch.float32", contiguous=True):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.contiguous = contiguous

    def numel(self):
        n = 1
        for s in self.shape:
            n *= s
        return n

    def is_contiguous(self):
        return self.contiguous

    def stride(self):
        return (1,) * len(self.shape)

    def detach(self):
        return self


class Shard:
    def __init__(self, dim):
        self.dim = dim


class Replicate:
    pass


class Mesh:
    def __init__(self, ranks, sizes):
        self.ranks, self.sizes = ranks, sizes

    def get_local_rank(self, mesh_dim=0):
        return self.ranks[mesh_dim]

    def size(self, dim=0):
        return self.sizes[dim]


class FakeDTensor(FakeTensor):
    def __init__(self, shape, placements, mesh, local_rows):
        super().__init__(shape)
        self.placements = placements
        self.device_mesh = mesh
        self.local = FakeTensor((local_rows,) + tuple(shape[1:]))

    def to_local(self):
        return self.local


class Module:
    def __init__(self, params=(), modules=()):
        self.params = list(params)
        self.modules = list(modules)

    def named_parameters(self):
        return iter(self.params)

    def named_modules(self):
        return iter(self.modules)


class FlatParameter(FakeTensor):
    pass


class Handle:
    def __init__(self, flat_param, rank, world_size):
        self.flat_param, self.rank, self.world_size = flat_param, rank, world_size


class NameTest(unittest.TestCase):
    def test_wrappers_dropped(self):
        self.assertEqual(rt.hf_name("_orig_mod.model._fsdp_wrapped_module.layers.0."
                                    "_checkpoint_wrapped_module.mlp.up_proj.weight"),
                         "model.layers.0.mlp.up_proj.weight")
        self.assertEqual(rt.hf_name("lm_head.weight"), "lm_head.weight")


class LayoutTest(unittest.TestCase):
    def test_plain(self):
        m = Module([("_orig_mod.model.norm.weight", FakeTensor((64,))),
                    ("_orig_mod.lm_head.weight", FakeTensor((250, 64), "torch.bfloat16"))])
        ts = rt.model_tensors(m)
        self.assertEqual([t["name"] for t in ts], ["model.norm.weight", "lm_head.weight"])
        self.assertEqual(ts[1]["shape"], (250, 64))
        self.assertEqual(ts[1]["dtype"], "bfloat16")
        self.assertNotIn("layout", ts[0])

    def test_fsdp2(self):
        # d0 = 10 over 4 ranks: c = 3; rank 3 holds row 9; HSDP: shard on mesh dim 1.
        w = FakeDTensor((10, 6), (Shard(0),), Mesh([3], [4]), 1)
        hsdp = FakeDTensor((8,), (Replicate(), Shard(0)), Mesh([1, 2], [2, 4]), 2)
        rep = FakeDTensor((5,), (Replicate(),), Mesh([0], [4]), 5)
        empty = FakeDTensor((3, 2), (Shard(0),), Mesh([3], [4]), 0)
        m = Module([("layers.0._fsdp_wrapped_module.w", w), ("h", hsdp), ("r", rep),
                    ("e", empty)])
        ts = {t["name"]: t for t in rt.model_tensors(m)}
        t = ts["layers.0.w"]
        self.assertEqual((t["layout"], t["shard_rank"], t["shard_world"]), ("fsdp2", 3, 4))
        self.assertEqual(t["shape"], (10, 6))
        self.assertIs(t["data"], w.local)
        self.assertEqual((ts["h"]["shard_rank"], ts["h"]["shard_world"]), (2, 4))
        self.assertNotIn("layout", ts["r"])
        self.assertIsNone(ts["e"]["data"])  # a rank past the rows registers none

    def test_fsdp2_refusals(self):
        m = Module([("w", FakeDTensor((4, 4), (Shard(1),), Mesh([0], [2]), 4))])
        with self.assertRaises(rlbridge.RlbError) as e:
            rt.model_tensors(m)
        self.assertIn("'w'", str(e.exception))
        self.assertEqual(e.exception.code, rlbridge._lib.EUNSUPPORTED)

    def test_fsdp1(self):
        # Unit "model.layers.0": a [3, 4] weight, 4 elements of alignment padding, a [5]
        # bias; 21 elements over world 2 -> total 22, this rank (1) holds 11.
        fp = FlatParameter((11,))
        fp._fqns = ("mlp._checkpoint_wrapped_module.w", "mlp.b")
        fp._shapes = ((3, 4), (5,))
        fp._numels_with_padding = (12, 4, 5)
        fp._is_padding_mask = [False, True, False]
        unit = Module()
        unit._handle = Handle(fp, 1, 2)
        fsdp = Module(params=[("model.layers.0._flat_param", fp),
                              ("model.layers.0.mlp.w", FakeTensor((3, 4))),  # a view of it
                              ("model.norm.weight", FakeTensor((64,)))],
                      modules=[("", Module()), ("model.layers.0", unit)])
        ts = rt.model_tensors(fsdp)
        self.assertEqual([t["name"] for t in ts], ["model.layers.0._flat_param",
                                                   "model.norm.weight"])
        u = ts[0]
        self.assertEqual((u["layout"], u["shard_rank"], u["shard_world"], u["unit"]),
                         ("fsdp1", 1, 2, 0))
        self.assertEqual(u["shape"], (22,))
        self.assertEqual(u["entries"], [
            dict(name="model.layers.0.mlp.w", shape=(3, 4), numel=12),
            dict(name=None, numel=4),
            dict(name="model.layers.0.mlp.b", shape=(5,), numel=5)])

    def test_refusals_name_the_parameter(self):
        for t, code in [(FakeTensor((4, 4), contiguous=False), rlbridge._lib.EINVAL),
                        (FakeTensor((4,), "torch.int64"), rlbridge._lib.EDTYPE)]:
            with self.assertRaises(rlbridge.RlbError) as e:
                rt.model_tensors(Module([("_orig_mod.layers.1.w", t)]))
            self.assertIn("'layers.1.w'", str(e.exception))
            self.assertEqual(e.exception.code, code)


if __name__ == "__main__":
    unittest.main()
