"""``sketchtune analyze-delta``: run the ΔW analysis over a model pair, write JSON and Figure-1-style plots."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._io import write_json_atomic
from ..architecture import find_decoder_layers, linear_modules
from ..checkpoint import load
from ..errors import SketchError
from ..modeling import is_sketched_dir, load_model
from ..sketched_linear import SketchedLinear
from ..train.adapter import WEIGHTS_NAME, codes_fingerprint, load_adapter
from .delta import ENERGIES, LayerDelta, analyze_layer, as_dict, mapping_from_weights


def _decoder_linears(model) -> dict[str, torch.nn.Module]:
    prefix, layers = find_decoder_layers(model)
    return {f"{prefix}.{i}.{n}": m for i, layer in enumerate(layers) for n, m in linear_modules(layer).items()}


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SketchError("plots need matplotlib: pip install matplotlib (or pass --no-plots)") from None


def _is_adapter(path: Path) -> bool:
    return (path / WEIGHTS_NAME).is_file() or (path.is_file() and path.suffix == ".safetensors")


def sketched_pairs(base: str, tuned: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, SketchedLinear]]:
    """(Ŵ_base, Ŵ_tuned, base layer) per sketched linear, for a sketched base and an adapter or sketched model.

    ΔW = Ŵ_tuned − Ŵ_base needs no dense model: both share the base's codes and differ only in codebooks.
    """
    base_model, _ = load(base, dtype=torch.float32)
    tuned_path = Path(tuned).expanduser()
    if _is_adapter(tuned_path):
        tuned_model = load_adapter(copy.deepcopy(base_model), tuned_path)
    elif is_sketched_dir(tuned_path):
        tuned_model, _ = load(tuned_path, dtype=torch.float32)
        if codes_fingerprint(tuned_model) != codes_fingerprint(base_model):
            raise SketchError(f"{tuned} has other codes than {base}: not a fine-tuned copy of that sketched base")
    elif tuned_path.exists():
        raise SketchError(f"with a sketched BASE, TUNED must be a sketch adapter or a sketched checkpoint: {tuned}")
    else:
        raise SketchError(f"no such file or directory: {tuned}")
    tuned_mods = dict(tuned_model.named_modules())
    return {name: (m.dequantize().detach().float(), tuned_mods[name].dequantize().detach().float(), m)
            for name, m in base_model.named_modules() if isinstance(m, SketchedLinear)}


def analyze_models(base: str, tuned: str, out_dir: str | os.PathLike, sketch: str | None = None, bits: int = 4,
                   gprs: tuple[int, ...] = (1, 2, 4, 8), max_layers: int | None = None, plots: bool = True) -> dict:
    """Compare every decoder linear of ``base`` and ``tuned``.

    Dense pair: mappings from ``sketch`` (a sketched checkpoint of ``base``) when given, else per-row k-means
    codes of the base weights at each GPR in ``gprs``. Sketched ``base`` (with a sketch adapter or a sketched
    checkpoint as ``tuned``): ΔW = Ŵ_tuned − Ŵ_base under the base's own codes, whose sketch error is zero by
    construction, so what the report adds is ΔW's rank profile and how well a low-rank update of the same budget
    could have matched it.
    """
    if plots:
        _require_matplotlib()  # before minutes of analysis, not after
    if is_sketched_dir(base):
        if sketch:
            raise SketchError("--sketch is for a dense BASE; a sketched BASE brings its own codes")
        pairs = sketched_pairs(base, tuned)
        items = [(n, w0, w1, {m.gpr: m.codes}, m.bits) for n, (w0, w1, m) in pairs.items()]
    else:
        items = _dense_items(base, tuned, sketch, bits, gprs, max_layers)
    items = items[:max_layers] if max_layers else items
    layers: list[LayerDelta] = []
    for name, W0, W1, mappings, b in tqdm(items, desc="analyzing ΔW", unit="layer"):
        bits = b
        layers.append(analyze_layer(name, W0, W1, mappings, b))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(layers)
    result = {"base": base, "tuned": tuned, "sketch": sketch, "bits": bits, "summary": summary, "layers": as_dict(layers)}
    write_json_atomic(out / "delta_analysis.json", result)
    if plots:
        plot(layers, out)
    return result


def _dense_items(base: str, tuned: str, sketch: str | None, bits: int, gprs: tuple[int, ...],
                 max_layers: int | None) -> list[tuple]:
    if Path(tuned).expanduser().exists() and is_sketched_dir(tuned):
        raise SketchError(f"{tuned} is sketched but {base} is not: pass the sketched base as BASE")
    base_model, _ = load_model(base, dtype=torch.float32)
    tuned_model, _ = load_model(tuned, dtype=torch.float32)
    base_lin, tuned_lin = _decoder_linears(base_model), _decoder_linears(tuned_model)
    if set(base_lin) != set(tuned_lin):
        raise SketchError("base and tuned models have different decoder layers; not a fine-tuned pair")
    sketched: dict[str, SketchedLinear] = {}
    if sketch:
        sk_model, _ = load_model(sketch, dtype=torch.float32)
        sketched = {n: m for n, m in sk_model.named_modules() if isinstance(m, SketchedLinear)}
        bits = next(iter(sketched.values())).bits
    items = []
    for name in list(base_lin)[:max_layers] if max_layers else base_lin:
        W0, W1 = base_lin[name].weight.detach(), tuned_lin[name].weight.detach()
        if W0.shape != W1.shape:
            raise SketchError(f"{name}: shapes differ between base {tuple(W0.shape)} and tuned {tuple(W1.shape)}")
        if name in sketched:
            mappings = {sketched[name].gpr: sketched[name].codes}
        else:
            mappings = {g: mapping_from_weights(W0, bits, g) for g in gprs if W0.shape[1] % g == 0}
        items.append((name, W0, W1, mappings, bits))
    return items


def summarize(layers: list[LayerDelta]) -> dict:
    """Means over layers: rank per energy level, and sketch vs low-rank error per GPR budget."""
    ranks = {k: sum(l.rank_for_energy[k] for l in layers) / len(layers) for k in layers[0].rank_for_energy}
    by_gpr: dict[int, dict] = {}
    for layer in layers:
        for b, t in zip(layer.budgets, layer.theorem):
            agg = by_gpr.setdefault(b["gpr"], {"sketch_error": 0.0, "lowrank_error": 0.0, "sketch_wins": 0,
                                              "theorem_agrees": 0, "layers": 0})
            agg["sketch_error"] += b["sketch_error"]
            agg["lowrank_error"] += b["lowrank_error"]
            agg["sketch_wins"] += int(t["measured_sketch_wins"])
            agg["theorem_agrees"] += int(t["measured_sketch_wins"] == t["theorem_says_sketch_wins"])
            agg["layers"] += 1
    for agg in by_gpr.values():
        agg["sketch_error"] /= agg["layers"]
        agg["lowrank_error"] /= agg["layers"]
    return {"mean_rank_for_energy": ranks, "mean_eta": sum(l.eta for l in layers) / len(layers),
            "by_gpr": {str(g): v for g, v in sorted(by_gpr.items())}}


def plot(layers: list[LayerDelta], out: Path) -> list[Path]:
    """Figure 1 analogues: rank per energy level by layer; sketch vs low-rank error by layer and budget."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SketchError("plots need matplotlib: pip install matplotlib (or pass --no-plots)") from None
    x = range(len(layers))
    fig, ax = plt.subplots(figsize=(10, 4))
    for key in (f"{int(e * 100)}%" for e in ENERGIES):
        ax.plot(x, [l.rank_for_energy[key] for l in layers], marker=".", label=f"{key} energy")
    ax.set(xlabel="linear layer (model order)", ylabel="rank needed", title="Rank needed to explain ΔW")
    ax.legend()
    fig.tight_layout()
    paths = [out / "delta_rank.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    gprs = sorted({b["gpr"] for l in layers for b in l.budgets})
    fig, axes = plt.subplots(1, len(gprs), figsize=(4.5 * len(gprs), 3.6), squeeze=False)
    for ax, g in zip(axes[0], gprs):
        rows = [(i, b) for i, l in enumerate(layers) for b in l.budgets if b["gpr"] == g]
        ax.plot([i for i, _ in rows], [b["sketch_error"] for _, b in rows], ".", label="sketch (Eq. 10)")
        ax.plot([i for i, _ in rows], [b["lowrank_error"] for _, b in rows], ".", label="low rank, equal params")
        ax.set(title=f"GPR {g}", xlabel="linear layer", ylabel="‖Δ−Δ̂‖/‖Δ‖", ylim=(0, 1.05))
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "delta_error.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
