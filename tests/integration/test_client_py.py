"""test_client_py: the Python package rlbridge against a real `rlb bridge --tiny` and two
`rlb worker --tiny` processes started here. Plain python3, no third-party packages (numpy
and torch are exercised when importable, skipped otherwise).

    RLBRIDGE_LIB=<build>/librlb.so python3 test_client_py.py <build>/rlb

The weights make the answer known by hand (as in test_client_bridge.c): decoder weights
zero, embedding rows and norms all ones, LM head zero but row T = a: greedy decoding emits T
at every step with logprob z - log(exp(z) + V - 1), z = 64 a / sqrt(1 + 1e-5).
"""

import array
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "client", "python"))
import rlbridge  # noqa: E402
from shm_own import own_entries  # noqa: E402

D, I, H, KV, HD, LAYERS, V = 64, 192, 4, 2, 16, 2, 250
RLB = None  # path of the rlb program (argv[1])


def tiny_params():
    """(name, shape, kind) of every tiny-model parameter; kind 0 zero, 1 ones, 2 LM head."""
    ps = [("model.embed_tokens.weight", (V, D), 1)]
    for l in range(LAYERS):
        p = f"model.layers.{l}."
        ps += [(p + "input_layernorm.weight", (D,), 1),
               (p + "self_attn.q_proj.weight", (H * HD, D), 0),
               (p + "self_attn.k_proj.weight", (KV * HD, D), 0),
               (p + "self_attn.v_proj.weight", (KV * HD, D), 0),
               (p + "self_attn.o_proj.weight", (D, H * HD), 0),
               (p + "post_attention_layernorm.weight", (D,), 1),
               (p + "mlp.gate_proj.weight", (I, D), 0),
               (p + "mlp.up_proj.weight", (I, D), 0),
               (p + "mlp.down_proj.weight", (D, I), 0)]
    return ps + [("model.norm.weight", (D,), 1), ("lm_head.weight", (V, D), 2)]


def expected_logprob(a):
    z = 64.0 * a / math.sqrt(1.0 + 1e-5)
    return z - math.log(math.exp(z) + V - 1)


class Cluster:
    """A bridge and two workers in a private socket directory."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="rlb-test-py-")
        self.sock = os.path.join(self.dir, "bridge")
        env = dict(os.environ, RLB_LOG="warn")
        self.procs = [subprocess.Popen([RLB, "bridge", "--socket", self.sock, "--tiny",
                                        "--threads", "1"], env=env)]
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if time.monotonic() > deadline:
                raise RuntimeError("the bridge did not start")
            time.sleep(0.01)
        for r in range(2):
            self.procs.append(subprocess.Popen(
                [RLB, "worker", "--bridge", self.sock, "--replica", str(r), "--replicas", "2",
                 "--tiny", "--threads", "1"], env=env))
        with rlbridge.Client(socket=self.sock, observer=True) as c:
            while c.bridge_stats().get("replicas_up", 0) < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not come up")
                time.sleep(0.02)

    def stop(self):
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=10) == 0
        assert not os.path.exists(self.sock)
        os.rmdir(self.dir)


class Trainer:
    """One rank holding the whole tiny model in alloc_host memory, as array views."""

    def __init__(self, sock):
        self.c = rlbridge.Client(socket=sock)
        self.views = {}
        tensors = []
        for name, shape, kind in tiny_params():
            view = rlbridge.host_array(self.c, "f", math.prod(shape))
            self.views[name] = (view, shape, kind)
            tensors.append(dict(name=name, data=view, shape=shape))
        self.c.register_many(tensors)

    def fill(self, target, a):
        for view, shape, kind in self.views.values():
            n = math.prod(shape)
            if kind == 1:
                view[:] = array.array("f", [1.0]) * n
            else:
                view[:] = array.array("f", [0.0]) * n
                if kind == 2:
                    view[target * D:(target + 1) * D] = array.array("f", [a]) * D


class ClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.shm_before = own_entries()
        cls.cluster = Cluster()

    @classmethod
    def tearDownClass(cls):
        pids = [p.pid for p in cls.cluster.procs]
        cls.cluster.stop()
        assert own_entries(pids) <= cls.shm_before

    def wait_no_trainers(self, cluster=None):
        """A new set of ranks may connect once the bridge saw the old ones go."""
        with rlbridge.Client(socket=(cluster or self.cluster).sock, observer=True) as obs:
            deadline = time.monotonic() + 10
            while obs.bridge_stats()["trainers"] > 0 and time.monotonic() < deadline:
                time.sleep(0.01)

    def greedy(self, c, min_version=0, max_tokens=5):
        sp = rlbridge.SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0)
        return c.generate([[3, 17], [200]], sp, min_weight_version=min_version,
                          timeout_ms=30000)

    def test_publish_and_generate(self):
        self.wait_no_trainers()
        t = Trainer(self.cluster.sock)
        v = t.c.weight_version
        for target, a in [(7, 0.05), (123, 0.1), (249, 0.03)]:
            t.fill(target, a)
            v += 1
            st = t.c.publish(v)
            self.assertEqual(st.version, v)
            self.assertGreaterEqual(st.bytes, 130624 * 4)
            self.assertGreater(st.ms, 0)
            self.assertEqual(t.c.weight_version, v)
            outs = self.greedy(t.c, v)
            self.assertEqual([o.prompt_token_ids for o in outs], [[3, 17], [200]])
            for o in outs:
                self.assertEqual(len(o.outputs), 1)
                s = o.outputs[0]
                self.assertEqual(s.index, 0)
                self.assertEqual(s.token_ids, [target] * 5)
                self.assertEqual(s.finish_reason, "length")
                self.assertEqual(s.weight_version, v)
                for lp in s.logprobs:
                    self.assertAlmostEqual(lp, expected_logprob(a), delta=2e-3)

        # Stop tokens end a sample (kept as its last token), logprobs off by default.
        sp = rlbridge.SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[249])
        s = t.c.generate([[1]], sp)[0].outputs[0]
        self.assertEqual((s.token_ids, s.finish_reason, s.logprobs), ([249], "stop", None))

        # Tickets: submit several, poll until each is there.
        tickets = [t.c.submit([[i + 1]], rlbridge.SamplingParams(temperature=0, max_tokens=2))
                   for i in range(4)]
        for tk in tickets:
            out = None
            deadline = time.monotonic() + 30
            while out is None and time.monotonic() < deadline:
                out = t.c.poll(tk)
                time.sleep(0.001)
            self.assertEqual(out[0].outputs[0].token_ids, [249, 249])
        with self.assertRaises(rlbridge.RlbError) as e:
            t.c.poll(tickets[0])  # spent
        self.assertEqual(e.exception.code, rlbridge._lib.ENOTFOUND)

        # n samples with a seed: reproducible, and the n samples are not all the same.
        for row in range(5):
            t.views["lm_head.weight"][0][row * D:(row + 1) * D] = array.array("f", [0.1]) * D
        v += 1
        t.c.publish(v)
        sp = rlbridge.SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, logprobs=True)
        a = t.c.generate([[5, 6]], sp)[0].outputs
        b = t.c.generate([[5, 6]], sp)[0].outputs
        self.assertEqual([x.index for x in a], [0, 1, 2, 3])
        self.assertEqual([x.token_ids for x in a], [x.token_ids for x in b])
        self.assertGreater(len({tuple(x.token_ids) for x in a}), 1)
        for x in a:
            self.assertEqual(len(x.logprobs), 8)
            self.assertTrue(all(lp <= 0 for lp in x.logprobs))

        # Refusals raise RlbError with the library's code and text.
        with self.assertRaises(rlbridge.RlbError) as e:
            t.c.publish(v)
        self.assertEqual(e.exception.code, rlbridge._lib.EINVAL)
        self.assertIn("already committed", str(e.exception))
        with self.assertRaises(rlbridge.RlbError) as e:
            t.c.generate([[1]], rlbridge.SamplingParams(top_p=0))
        self.assertEqual(e.exception.code, rlbridge._lib.EINVAL)
        with self.assertRaises(rlbridge.RlbError) as e:
            t.c.generate([[1]], rlbridge.SamplingParams(logprobs=3))
        self.assertEqual(e.exception.code, rlbridge._lib.EUNSUPPORTED)
        with self.assertRaises(rlbridge.RlbError) as e:
            t.c.register("x", array.array("f", [0.0] * 4), shape=(4,))  # not alloc_host memory
        self.assertEqual(e.exception.code, rlbridge._lib.EINVAL)
        with self.assertRaises(rlbridge.RlbError) as e:  # checked before anything is sent
            t.c.register("x", t.views["model.norm.weight"][0], shape=(4, 0))
        self.assertEqual(e.exception.code, rlbridge._lib.ESHAPE)
        self.assertIn("tensor 'x': shape[1] is 0", str(e.exception))
        with self.assertRaises(rlbridge.RlbError) as e:
            t.c.free_host(t.views["model.norm.weight"][0])  # still registered
        self.assertEqual(e.exception.code, rlbridge._lib.EEXIST)

        stats = t.c.stats()
        self.assertEqual(stats["synced"], 4)
        self.assertEqual(stats["tensors"], len(tiny_params()))
        self.assertGreaterEqual(t.c.bridge_stats()["syncs"], 4)
        t.c.unregister()
        t.c.free_host(t.views["model.norm.weight"][0])
        t.c.close()

    def test_lora_adapters(self):
        """A rank-1 adapter on lm_head moves the greedy token; taking it back restores it."""
        self.wait_no_trainers()
        t = Trainer(self.cluster.sock)
        t.fill(7, 0.05)
        a = rlbridge.host_array(t.c, "f", D)  # A [1, D]
        b = rlbridge.host_array(t.c, "f", V)  # B [V, 1]
        with self.assertRaises(rlbridge.RlbError) as e:  # not declared yet
            t.c.register("lm_head.lora_A.weight", a, shape=(1, D))
        self.assertEqual(e.exception.code, rlbridge._lib.ENOTFOUND)
        t.c.register_lora([dict(target="base_model.model.lm_head.weight", rank=1, alpha=2.0)])
        t.c.register_many([dict(name="lm_head.lora_A.weight", data=a, shape=(1, D)),
                           dict(name="lm_head.lora_B.weight", data=b, shape=(V, 1))])
        a[:] = array.array("f", [1.0]) * D
        b[123] = 0.05  # merged row 123 = 2 * 0.05 = 0.1, above row 7's 0.05
        v = t.c.weight_version + 1
        t.c.publish(v)
        for o in self.greedy(t.c, v):
            self.assertEqual(o.outputs[0].token_ids, [123] * 5)
        t.c.unregister_lora()
        t.c.publish(v + 1)
        for o in self.greedy(t.c, v + 1):
            self.assertEqual(o.outputs[0].token_ids, [7] * 5)
        t.c.unregister()
        t.c.close()

    def test_threads_share_a_client(self):
        """Generation from several threads while the main thread publishes."""
        self.wait_no_trainers()
        t = Trainer(self.cluster.sock)
        v = t.c.weight_version + 1
        t.fill(11, 0.05)
        t.c.publish(v)
        errors = []

        def gen():
            try:
                for _ in range(10):
                    out = self.greedy(t.c, v, 2)
                    for o in out:
                        if o.outputs[0].weight_version < v:
                            errors.append("old version")
            except rlbridge.RlbError as e:
                errors.append(str(e))

        ths = [threading.Thread(target=gen) for _ in range(3)]
        for th in ths:
            th.start()
        for k in range(3):
            t.fill(11 + k, 0.05)
            t.c.publish(v + 1 + k)
        for th in ths:
            th.join()
        self.assertEqual(errors, [])
        t.c.close()

    def test_sharded_ranks(self):
        """Two FSDP2 ranks, then two FSDP1 ranks (one FlatParameter of the whole model),
        publishing from two threads; greedy output shows the weights landed whole. A bridge
        keeps the trainer world of its first trainer, so this runs on a bridge of its own."""
        cluster = Cluster()
        try:
            self.sharded_ranks(cluster)
        finally:
            cluster.stop()

    def sharded_ranks(self, cluster):
        params = tiny_params()

        def value(kind, row, target, a):
            return 1.0 if kind == 1 else a if kind == 2 and row == target else 0.0

        def publish_all(clients, v):
            errs = []
            ths = [threading.Thread(target=lambda c=c: errs.append(c.publish(v).version))
                   for c in clients]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            self.assertEqual(errs, [v, v])

        # FSDP2: rank r holds rows [r*c, r*c + n) of every tensor, c = ceil(d0 / 2).
        ranks = [rlbridge.Client(socket=cluster.sock, rank=r, world=2) for r in range(2)]
        shards = []
        for r, c in enumerate(ranks):
            mine, specs = [], []
            for name, shape, kind in params:
                d0 = shape[0]
                rows_per = (d0 + 1) // 2
                first, n = r * rows_per, min(rows_per, d0 - r * rows_per)
                cols = math.prod(shape[1:])
                view = rlbridge.host_array(c, "f", n * cols)
                mine.append((view, first, n, cols, kind))
                specs.append(dict(name=name, data=view, shape=shape, layout="fsdp2",
                                  shard_rank=r, shard_world=2))
            c.register_many(specs)
            shards.append(mine)
        v = ranks[0].weight_version
        for target, a in [(19, 0.05), (230, 0.07)]:
            for mine in shards:
                for view, first, n, cols, kind in mine:
                    for row in range(n):
                        view[row * cols:(row + 1) * cols] = array.array(
                            "f", [value(kind, first + row, target, a)]) * cols
            v += 1
            publish_all(ranks, v)
            s = self.greedy(ranks[1], v)[0].outputs[0]
            self.assertEqual(s.token_ids, [target] * 5)
            self.assertAlmostEqual(s.logprobs[0], expected_logprob(a), delta=2e-3)
        for c in ranks:
            c.close()
        self.wait_no_trainers(cluster)

        # FSDP1: the whole model as one flat unit, each rank half of it.
        flat = array.array("f")
        entries = []
        for name, shape, kind in params:
            entries.append(dict(name=name, shape=shape, numel=math.prod(shape)))
        total = sum(e["numel"] for e in entries)
        ranks = [rlbridge.Client(socket=cluster.sock, rank=r, world=2) for r in range(2)]
        chunks = []
        for r, c in enumerate(ranks):
            view = rlbridge.host_array(c, "f", total // 2)
            c.register("flat_param.0", view, shape=(total,), layout="fsdp1", shard_rank=r,
                       shard_world=2, entries=entries)
            chunks.append(view)
        target, a = 101, 0.06
        for name, shape, kind in params:
            cols = math.prod(shape[1:])
            for row in range(shape[0]):
                flat.extend(array.array("f", [value(kind, row, target, a)]) * cols)
        chunks[0][:] = flat[:total // 2]
        chunks[1][:] = flat[total // 2:]
        v += 1
        publish_all(ranks, v)
        self.assertEqual(self.greedy(ranks[0], v)[0].outputs[0].token_ids, [target] * 5)

        # Asleep: a request is held by the bridge and completes after wake_up.
        ranks[0].sleep()
        sp = rlbridge.SamplingParams(temperature=0, max_tokens=5, logprobs=0)
        held = ranks[0].submit([[3, 17]], sp, min_weight_version=v)
        time.sleep(0.3)
        self.assertIsNone(ranks[0].poll(held))
        ranks[0].wake_up()
        self.assertEqual(ranks[0].wait(held, timeout_ms=30000)[0].outputs[0].token_ids,
                         [target] * 5)
        self.assertEqual(self.greedy(ranks[1], v)[0].outputs[0].token_ids, [target] * 5)
        for c in ranks:
            c.close()

    def test_numpy_and_torch(self):
        try:
            import numpy as np
        except ImportError:
            self.skipTest("numpy not installed")
        c = rlbridge.Client(socket=self.cluster.sock)
        arrays = {}
        for name, shape, kind in tiny_params():
            a = np.frombuffer(c.alloc_host(4 * math.prod(shape)), dtype=np.float32)
            a = a.reshape(shape)
            a[...] = 1.0 if kind == 1 else 0.0
            arrays[name] = a
        arrays["lm_head.weight"][77] = 0.05
        c.register_many([dict(name=n, data=a) for n, a in arrays.items()])
        v = c.weight_version + 1
        c.publish(v)
        self.assertEqual(self.greedy(c, v)[0].outputs[0].token_ids, [77] * 5)
        c.close()

    def test_connect_errors(self):
        with self.assertRaises(rlbridge.RlbError) as e:
            rlbridge.Client(socket=os.path.join(self.cluster.dir, "nobody"))
        self.assertEqual(e.exception.code, rlbridge._lib.ENOTFOUND)
        with self.assertRaises(rlbridge.RlbError) as e:
            rlbridge.Client(socket=self.cluster.sock, rank=3, world=2)
        self.assertEqual(e.exception.code, rlbridge._lib.EINVAL)
        obs = rlbridge.Client(socket=self.cluster.sock, observer=True)
        with self.assertRaises(rlbridge.RlbError) as e:
            obs.publish(1000)
        self.assertEqual(e.exception.code, rlbridge._lib.EPERM)
        obs.close()
        with self.assertRaises(rlbridge.RlbError):
            obs.generate([[1]])  # closed


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: test_client_py.py <path to rlb>")
    RLB = sys.argv.pop(1)
    unittest.main()
