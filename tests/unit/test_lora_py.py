"""test_lora_py: the Python side of LoRA that needs no bridge and no torch: peft_to_hf over
librlb, and rlbridge.torch's lora_declarations / peft_parameters on a stand-in for a PEFT
model (the attributes PEFT's LoraLayer has: r, lora_alpha, lora_A / lora_embedding_A keyed
by adapter name). Importing rlbridge.torch must work without torch.

    RLBRIDGE_LIB=<build>/librlb.so python3 test_lora_py.py
"""

import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "client", "python"))
import rlbridge  # noqa: E402
import rlbridge.torch as rtorch  # noqa: E402


class Module:
    """A module with PEFT LoraLayer's adapter attributes (or none)."""

    def __init__(self, adapters=None, embedding=False):
        adapters = adapters or {}
        self.r = {k: r for k, (r, _) in adapters.items()}
        self.lora_alpha = {k: alpha for k, (_, alpha) in adapters.items()}
        if adapters:
            setattr(self, "lora_embedding_A" if embedding else "lora_A",
                    {k: object() for k in adapters})


class PeftConfig:
    def __init__(self, use_rslora):
        self.use_rslora = use_rslora


class PeftModel:
    """named_modules / named_parameters / peft_config, as torch and PEFT give them."""

    def __init__(self):
        pre = "base_model.model."
        self.modules = [
            (pre + "model.embed_tokens", Module({"default": (4, 8.0)}, embedding=True)),
            (pre + "model.layers.0.self_attn.q_proj", Module({"default": (8, 16.0),
                                                               "other": (2, 1.0)})),
            (pre + "model.layers.0.self_attn.q_proj.base_layer", Module()),
            (pre + "model.layers.0.mlp.down_proj", Module({"other": (2, 1.0)})),
            (pre + "model.norm", Module()),
        ]
        self.params = [
            pre + "model.embed_tokens.base_layer.weight",
            pre + "model.embed_tokens.lora_embedding_A.default",
            pre + "model.embed_tokens.lora_embedding_B.default",
            pre + "model.layers.0.self_attn.q_proj.base_layer.weight",
            pre + "model.layers.0.self_attn.q_proj.lora_A.default.weight",
            pre + "model.layers.0.self_attn.q_proj.lora_B.default.weight",
            pre + "model.layers.0.self_attn.q_proj.lora_A.other.weight",
            pre + "model.layers.0.mlp.down_proj.base_layer.weight",
            pre + "model.norm.weight",
            pre + "lm_head.weight",
        ]
        self.peft_config = {"default": PeftConfig(True), "other": PeftConfig(False)}

    def named_modules(self):
        return iter(self.modules)

    def named_parameters(self):
        return ((n, object()) for n in self.params)


class LoraPyTest(unittest.TestCase):
    def test_peft_to_hf(self):
        self.assertEqual(
            rlbridge.peft_to_hf("base_model.model.model.layers.3.mlp.up_proj.lora_B.default."
                                "weight", "default"),
            "model.layers.3.mlp.up_proj.lora_B.weight")
        self.assertEqual(rlbridge.peft_to_hf("base_model.model.model.embed_tokens."
                                             "lora_embedding_A.default"),
                         "model.embed_tokens.lora_A.weight")
        with self.assertRaises(rlbridge.RlbError) as e:
            rlbridge.peft_to_hf("base_model.model.model.layers.0.self_attn.q_proj.lora_A."
                                "other.weight", "default")
        self.assertEqual(e.exception.code, rlbridge._lib.ENOTFOUND)
        self.assertIn("a factor of adapter 'other', not of 'default'", str(e.exception))
        with self.assertRaises(rlbridge.RlbError) as e:
            rlbridge.peft_to_hf("x.lora_magnitude_vector.default.weight")
        self.assertEqual(e.exception.code, rlbridge._lib.EUNSUPPORTED)
        self.assertIn("DoRA's lora_magnitude_vector", str(e.exception))

    def test_declarations(self):
        m = PeftModel()
        self.assertEqual(rtorch.lora_declarations(m), [
            {"target": "model.embed_tokens.weight", "rank": 4, "alpha": 8.0, "rslora": True},
            {"target": "model.layers.0.self_attn.q_proj.weight", "rank": 8, "alpha": 16.0,
             "rslora": True},
        ])
        self.assertEqual([d["target"] for d in rtorch.lora_declarations(m, "other")],
                         ["model.layers.0.self_attn.q_proj.weight",
                          "model.layers.0.mlp.down_proj.weight"])

    def test_parameters(self):
        m = PeftModel()
        self.assertEqual([n for n, _ in rtorch.peft_parameters(m)], [
            "model.embed_tokens.weight", "model.embed_tokens.lora_A.weight",
            "model.embed_tokens.lora_B.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "model.layers.0.self_attn.q_proj.lora_B.weight",
            "model.layers.0.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight",
        ])
        self.assertEqual([n for n, _ in rtorch.peft_parameters(m, "other", base=False)],
                         ["model.layers.0.self_attn.q_proj.lora_A.weight"])


if __name__ == "__main__":
    unittest.main()
