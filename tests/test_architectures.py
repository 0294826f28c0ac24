"""Any Hugging Face causal LM: tiny random-weight models of many architecture families.

Random weights are fine here: what is checked is plumbing that does not depend on what the weights say —
every layer is calibrated on the inputs the model itself gives it, every projection inside the decoder layers
is sketched (or reported as left dense, with the reason), and ``from_pretrained`` rebuilds the exact model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import sketchtune
from sketchtune.architecture import PROJECTIONS, find_decoder_layers
from sketchtune.bundled import BUNDLED_MODEL
from sketchtune.sketch.calibration import calibration_tokens, capture_layer_inputs
from sketchtune.sketched_linear import SketchedLinear

VOCAB = 2048  # the bundled tokenizer's
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

CONFIGS = {
    "llama": ("LlamaConfig", COMMON),
    "mistral": ("MistralConfig", {**COMMON, "sliding_window": 16}),
    "qwen2": ("Qwen2Config", {**COMMON, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {**COMMON, "head_dim": 16, "layer_types": ["full_attention", "sliding_attention",
                                                                          "full_attention"],
                              "use_sliding_window": True, "sliding_window": 16}),
    "phi3": ("Phi3Config", {**COMMON, "num_key_value_heads": 4, "pad_token_id": 0}),
    "gemma": ("GemmaConfig", {**COMMON, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**COMMON, "head_dim": 16, "sliding_window": 16}),
    "gemma3": ("Gemma3TextConfig", {**COMMON, "head_dim": 16, "sliding_window": 16, "num_hidden_layers": 4,
                                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                                                    "full_attention"], "rope_local_base_freq": 100.0}),
    "olmo2": ("Olmo2Config", COMMON),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", {**COMMON, "num_key_value_heads": 4}),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=3,
                              num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)),
    "falcon": ("FalconConfig", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    new_decoder_architecture=True, num_kv_heads=2)),
    "stablelm": ("StableLmConfig", {**COMMON, "num_key_value_heads": 4}),
}
#: Models whose layers differ from each other (sliding vs global attention, other rotary bases).
HETEROGENEOUS = ("qwen2", "qwen3", "gemma2", "gemma3")


# Tiny matrices: one thread avoids OpenMP barriers, which cost seconds when a core is busy.
pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str) -> torch.nn.Module:
    cls_name, kwargs = CONFIGS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # random init is tiny; make attention and residuals matter
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(BUNDLED_MODEL)


def projection_count(model) -> int:
    _, layers = find_decoder_layers(model)
    return sum(isinstance(m, PROJECTIONS) for layer in layers for m in layer.modules())


@pytest.mark.parametrize("name", HETEROGENEOUS + ("llama", "gpt2", "falcon"))
def test_propagated_states_equal_the_models_own(name, tok):
    """Layer by layer with the captured arguments reproduces the model's own hidden states (no sketching)."""
    model = build(name)
    ids = calibration_tokens(tok, "c4", nsamples=2, seqlen=64, seed=0)
    inputs = capture_layer_inputs(model, [ids], "cpu")
    _, layers = find_decoder_layers(model)
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        hidden = inputs.hidden
        torch.testing.assert_close(hidden[0], expected[0])
        for i in range(len(layers) - 1):
            hidden = inputs.call(layers[i], i, hidden)
            err = (hidden[0] - expected[i + 1]).norm() / expected[i + 1].norm()
            assert err < 1e-5, f"{name}: layer {i + 1} input off by {err:.2e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sketch_save_reload_every_family(name, tok, tmp_path):
    model = build(name)
    n_proj = projection_count(model)
    prefix, _ = find_decoder_layers(model)
    sketched = copy.deepcopy(model)
    report = sketchtune.sketch_model(sketched, tok, calib="c4", nsamples=4, seqlen=64, bits=4, gpr=1,
                                     progress=False)
    n_sketched = sum(isinstance(m, SketchedLinear) for m in sketched.modules())
    assert n_sketched == n_proj == len(report.module_errors) and not report.left_dense
    assert not any(isinstance(m, PROJECTIONS) for m in sketched.get_submodule(prefix).modules())
    sketchtune.save(sketched, tok, tmp_path / name, dtype="float32")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()
    ids = torch.arange(5, 45)[None]
    with torch.no_grad():
        dense, ours, loaded = model(ids).logits, sketched(ids).logits, reloaded(ids).logits
    assert torch.equal(ours, loaded)
    assert torch.isfinite(ours).all() and not torch.equal(ours, dense)
    # Random Gaussian rows at INT4: each layer's calibration output error is a few 1e-3 (measured ≤ 1.2e-2).
    assert max(report.module_errors.values()) < 0.03, f"{name}: {max(report.module_errors.values()):.3g}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_family_embeddings_sketched_tied_or_not(name, tok, tmp_path):
    """Lookups (with Gemma-3's row scale), tied and untied heads, and reloading, on every family."""
    model = build(name)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    plain, full = copy.deepcopy(model), copy.deepcopy(model)
    settings = dict(calib="c4", nsamples=4, seqlen=64, bits=4, gpr=1, progress=False)
    sketchtune.sketch_model(plain, tok, **settings)
    report = sketchtune.sketch_model(full, tok, **settings, embeddings=True)
    spec = full.config.quantization_config.embeddings
    assert spec["tied"] == tied
    table, head = full.get_submodule(spec["input"]), full.get_submodule(spec["output"])
    assert (head.codebook is table.codebook) == tied and spec["output"] in report.module_errors
    with torch.no_grad():  # the decoder-only sketch carrying the dequantized tables must give the same logits
        plain.get_input_embeddings().weight.copy_(table.dequantize())
        if not tied:
            plain.get_output_embeddings().weight.copy_(head.dequantize())
        ids = torch.arange(5, 45)[None]
        ours = full(ids).logits
        torch.testing.assert_close(ours, plain(ids).logits, rtol=1e-4, atol=1e-4)
    sketchtune.save(full, tok, tmp_path / name, dtype="float32")
    reloaded, _ = sketchtune.load(tmp_path / name, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ours)


MOE = {
    "mixtral": ("MixtralConfig", {**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {**COMMON, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "decoder_sparse_step": 1}),
}


def build_moe(name: str) -> torch.nn.Module:
    cls_name, kwargs = MOE[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("name", list(MOE))
def test_moe_every_expert_matrix_sketched(name, tok, tmp_path):
    from sketchtune.experts import SketchedExperts

    model = build_moe(name)
    n_linear = projection_count(model)  # attention projections (the router is not a projection)
    experts = model.config.num_local_experts if name == "mixtral" else model.config.num_experts
    sketched = copy.deepcopy(model)
    report = sketchtune.sketch_model(sketched, tok, calib="c4", nsamples=8, seqlen=64, progress=False)
    n_sketched = sum(isinstance(m, SketchedLinear) for m in sketched.modules())
    assert n_sketched == n_linear + 3 * 2 * experts  # + gate_up and down of every expert of every layer
    assert sum(isinstance(m, SketchedExperts) for m in sketched.modules()) == 3
    assert set(report.left_dense) == {f"model.layers.{i}.mlp.gate.weight" for i in range(3)}  # routers only
    assert all("router" in why for why in report.left_dense.values())
    sketchtune.save(sketched, tok, tmp_path / name, dtype="float32")
    # Stored under the hub's module names, as transformers' own save of the dense model (vLLM's model code uses
    # them: Mixtral's block_sparse_moe), with the sketched experts per expert under their own keys.
    model.save_pretrained(tmp_path / f"{name}-dense")
    stored, dense = (set(safe_open(str(d / "model.safetensors"), "pt").keys())
                     for d in (tmp_path / name, tmp_path / f"{name}-dense"))
    assert {k for k in stored if k.endswith(".gate.weight")} == {k for k in dense if k.endswith(".gate.weight")}
    block = next(k for k in dense if k.endswith(".gate.weight")).removesuffix(".gate.weight")
    assert f"{block}.experts.gate_up_proj.0.codebook" in stored and f"{block}.experts.down_proj.3.weight" in stored
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()
    ids = torch.arange(5, 45)[None]
    with torch.no_grad():
        ours, loaded, dense = sketched(ids).logits, reloaded(ids).logits, model(ids).logits
    assert torch.equal(ours, loaded) and not torch.equal(ours, dense)
    assert max(report.module_errors.values()) < 0.05
    info = __import__("sketchtune.info", fromlist=["describe"]).describe(tmp_path / name)
    assert info["sketched_modules"] == n_sketched


def test_sketched_experts_forward_is_the_eager_experts_loop(tok):
    """SketchedExperts computes what transformers' experts module computes with Ŵ in place of W."""
    model = build_moe("mixtral")
    original = copy.deepcopy(model.model.layers[0].mlp.experts)
    sketchtune.sketch_model(model, tok, calib="c4", nsamples=4, seqlen=64, progress=False)
    ours = model.model.layers[0].mlp.experts
    with torch.no_grad():
        for e in range(ours.num_experts):
            original.gate_up_proj[e] = ours.gate_up_proj[e].dequantize()
            original.down_proj[e] = ours.down_proj[e].dequantize()
        x = torch.randn(10, 64)
        index = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3], [3, 1], [2, 0], [1, 0], [3, 2], [0, 2], [1, 3]])
        weights = torch.rand(10, 2)
        torch.testing.assert_close(ours(x, index, weights), original(x, index, weights), rtol=1e-5, atol=1e-5)


def test_experts_op_on_engine_routing_is_the_sketched_experts_block(tok):
    """``sketchtune::experts`` (what vLLM calls with its own routing, stacked w13/w2 tensors) computes what
    ``SketchedExperts`` computes for the same top-k, and passes ``opcheck``."""
    from sketchtune.kernels import ops

    model = build_moe("qwen3_moe")
    sketchtune.sketch_model(model, tok, calib="c4", nsamples=4, seqlen=64, bits=3, gpr=2, progress=False)
    block = model.model.layers[1].mlp.experts
    stack = lambda mods, name: torch.stack([getattr(m, name) for m in mods])  # noqa: E731
    args = (stack(block.gate_up_proj, "weight"), stack(block.gate_up_proj, "codebook"),
            stack(block.down_proj, "weight"), stack(block.down_proj, "codebook"), 3)
    torch.manual_seed(1)
    x = torch.randn(9, 64)
    weights, index = torch.softmax(torch.randn(9, 4), -1).topk(2, dim=-1)
    index[0] = torch.tensor([3, 0])  # every expert hit, expert 2 by one token only
    with torch.no_grad():
        expected = block(x, index, weights)
        got = ops.experts_forward(x, weights, index.int(), *args)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.ops.sketchtune.experts(x, weights, index, *args), expected,
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(ops.experts_forward(x, weights * 0, index, *args), torch.zeros_like(x))
    torch.library.opcheck(torch.ops.sketchtune.experts.default, (x, weights, index, *args),
                          test_utils=("test_schema", "test_faketensor"))  # inference only: no autograd formula


def test_moe_fallback_and_codebook_training(tok, tmp_path):
    """Experts with too few routed tokens fall back (and are reported); training moves only codebooks."""
    from sketchtune.train.trainer import prepare_for_training

    model = build_moe("mixtral")
    report = sketchtune.sketch_model(model, tok, calib="c4", nsamples=4, seqlen=32, progress=False,
                                     min_expert_tokens=10**6)
    assert len(report.expert_fallbacks) == 3 * 4 and all(isinstance(n, int) for n in report.expert_fallbacks.values())
    assert all(v < 0.2 for v in report.module_errors.values())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_for_training(model)
    model.train()
    ids = torch.arange(5, 37)[None]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed and all(k.endswith(".codebook") for k in changed)
    assert any(".experts.down_proj." in k for k in changed)
    model.save_pretrained(tmp_path / "plain")  # transformers' own save (as Trainer checkpoints use) works too
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_info_lists_what_stayed_dense(tok, tmp_path, capsys):
    from sketchtune.cli import main

    config = transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    sketchtune.sketch_model(model, tok, method="rtn", progress=False)
    sketchtune.save(model, tok, tmp_path / "moe")
    assert main(["info", str(tmp_path / "moe")]) == 0
    out = capsys.readouterr().out
    assert "left dense inside the decoder layers (3 matrices)" in out  # the routers
    assert "model.layers.2.mlp.gate.weight: mixture-of-experts router" in out


def test_gpt2_conv1d_is_sketched_through_the_cli(tok, tmp_path, capsys):
    from sketchtune.cli import main

    build("gpt2").save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    code = main(["sketch", str(tmp_path / "gpt2"), "--out", str(tmp_path / "sk"), "--eval-data", "",
                 "--nsamples", "2", "--seqlen", "32"])
    out = capsys.readouterr().out
    assert code == 0 and "every weight matrix inside the decoder layers is sketched" in out
    assert main(["info", str(tmp_path / "sk"), "--json"]) == 0
    info = __import__("json").loads(capsys.readouterr().out)
    assert info["sketched_modules"] == 4 * 3 and info["left_dense"] == {}
