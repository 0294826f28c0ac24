"""vLLM serves a sketched checkpoint exactly as sketchtune runs it (the ``quant_method: "sketchtune"`` plugin).

vLLM pins its own transformers, so it usually lives in another environment: the test runs
``tests/vllm_runner.py`` under ``$SKETCHTUNE_VLLM_PYTHON`` (a Python with ``pip install -e ".[serve]"``), or
in this interpreter when vLLM imports here, and is skipped, saying so, when neither has vLLM. The model is a
random-weight Llama built here with head_dim 64 (vLLM's CPU attention refuses the bundled model's 16), so
log-probabilities are compared, not just greedy tokens — in four variants: dense embeddings, sketched
embeddings with a tied and with an untied head, and Qwen3-MoE and Mixtral models whose experts are sketched
(vLLM routes, ``sketchtune::experts`` runs them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MixtralConfig, Qwen3MoeConfig

import sketchtune
from sketchtune.bundled import BUNDLED_MODEL

RUNNER = Path(__file__).with_name("vllm_runner.py")
PROMPTS = ["Once upon a time", "The little dog", "Tom and Lily went"]


def vllm_python() -> str | None:
    python = os.environ.get("SKETCHTUNE_VLLM_PYTHON")
    if python:
        return python
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


pytestmark = pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed here and SKETCHTUNE_VLLM_PYTHON "
                                "is not set (vLLM pins transformers: install `.[serve]` in its own environment)")


#: (config class, tie_word_embeddings, sketch_model options): a dense untied head, a sketched tied table (one
#: table for lookups and logits), a sketched untied pair in a layout of its own (INT3 GPR 2, layers INT4 GPR 4),
#: and two mixture-of-experts models (4 experts, top 2) with every expert sketched: Qwen3-MoE, and Mixtral, whose
#: blocks transformers calls ``mlp`` and its checkpoints and vLLM ``block_sparse_moe`` (sketchtune.naming).
VARIANTS = {"dense-embeddings": (LlamaConfig, False, {}), "sketched-tied": (LlamaConfig, True, {"embeddings": True}),
            "sketched-untied": (LlamaConfig, False, {"embeddings": True, "embedding_bits": 3, "embedding_gpr": 2}),
            "moe-qwen3": (Qwen3MoeConfig, False, {}), "moe-mixtral": (MixtralConfig, False, {})}
MOE = {Qwen3MoeConfig: {"head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                        "decoder_sparse_step": 1, "norm_topk_prob": True},
       MixtralConfig: {"num_local_experts": 4, "num_experts_per_tok": 2}}


def sketch_variant(name: str, out: Path) -> Path:
    config_cls, tied, options = VARIANTS[name]
    tok = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    config = config_cls(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        **MOE.get(config_cls, {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    sketchtune.sketch_model(model, tok, calib="c4", nsamples=4, seqlen=64, bits=4, gpr=4, progress=False, **options)
    if config_cls in MOE:
        assert model.config.quantization_config.expert_modules  # the experts are sketched, not left dense
    sketchtune.save(model, tok, out, dtype="float32")
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Every variant sketched and served by one vLLM process (its start-up is most of the cost)."""
    root = tmp_path_factory.mktemp("vllm")
    dirs = {name: sketch_variant(name, root / name) for name in VARIANTS}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TRITON_INTERPRET": "0"}
    run = subprocess.run([vllm_python(), str(RUNNER), str(root / "vllm.json"), *dirs.values(), "--", *PROMPTS],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((root / "vllm.json").read_text())
    return {name: (path, results[str(path)]) for name, path in dirs.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vllm_matches_sketchtune_token_for_token_and_in_log_probabilities(served, variant):
    sketched, served = served[variant]
    assert served["quantization"] == "sketchtune"
    model, tok = sketchtune.load(sketched, dtype=torch.float32)
    model.eval()
    for row in served["rows"]:
        ids = torch.tensor([row["prompt_ids"]])
        with torch.no_grad():
            ours = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
            logp = torch.log_softmax(model(torch.tensor([row["prompt_ids"] + row["tokens"]])).logits[0], -1)
        assert ours == row["tokens"], row["prompt"]
        for step, top in enumerate(row["logprobs"]):
            for token, value in top.items():
                assert abs(logp[ids.shape[1] - 1 + step, int(token)].item() - value) < 1e-4, (row["prompt"], step)
