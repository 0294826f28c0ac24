"""The package's import graph has no circle, and the format has one owner.

Every ``import`` inside ``src/sketchtune`` — module-level or inside a function — is an edge; a function-local
import that exists to dodge a circle is still a circle here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import sketchtune

PACKAGE = Path(sketchtune.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: sketchtune modules it imports}, from the source, with ``from . import x`` resolved to modules."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")
                    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in files else prefix for a in node.names]
            for t in targets:
                while t and t not in files:  # sketchtune.x.y (an attribute) -> its module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_submodule_imports_the_package_root():
    graph = import_graph()
    offenders = [m for m, deps in graph.items() if "sketchtune" in deps and m not in ("sketchtune", "sketchtune.__main__")]
    assert not offenders


def test_format_has_one_owner():
    """The column -> codebook-slot formula and the bits check are written once, in sketchtune.layout."""
    slot_formula = re.compile(r"//\s*\(?\s*\w+\s*//\s*\w*gpr")  # column // (cols // gpr)
    bits_lists = re.compile(r"\(2,\s*3,\s*4\)|\[2,\s*3,\s*4\]|\{2,\s*3,\s*4\}")
    for path in PACKAGE.rglob("*.py"):
        if path.name == "layout.py" or path.parent.name == "kernels" and path.name == "triton_kernels.py":
            continue
        text = path.read_text()
        assert not slot_formula.search(text), f"{path.name} computes codebook slots itself"
        assert not bits_lists.search(text), f"{path.name} keeps its own list of supported bits"


def test_format_version_recorded_and_checked(sketched_dir, tmp_path, capsys):
    import json
    import shutil

    import pytest

    from sketchtune.cli import main
    from sketchtune.layout import FORMAT_VERSION

    cfg = json.loads((sketched_dir / "config.json").read_text())
    assert cfg["quantization_config"]["format_version"] == FORMAT_VERSION == 1
    old = tmp_path / "old"  # written before versions were recorded (and with the unused module_overrides)
    shutil.copytree(sketched_dir, old)
    qc = dict(cfg["quantization_config"], module_overrides={})
    del qc["format_version"]
    (old / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    model, _ = sketchtune.load(old)
    assert model.config.quantization_config.format_version == 1
    new = tmp_path / "new"
    shutil.copytree(sketched_dir, new)
    (new / "config.json").write_text(json.dumps({**cfg, "quantization_config": {**cfg["quantization_config"],
                                                                               "format_version": 2}}))
    assert main(["info", str(new)]) == 2
    err = capsys.readouterr().err
    assert "sketch format version 2" in err and "upgrade sketchtune" in err
    with pytest.raises(sketchtune.SketchError, match="format version 2"):
        sketchtune.load(new)


def test_workflows_run_the_main_job_without_the_cli(tmp_path):
    from sketchtune.workflows import sketch_job

    job = sketch_job(out=tmp_path / "sk", nsamples=4, seqlen=64, eval_data=("tinystories",), eval_seqlen=64,
                     eval_windows=2, sample_tokens=4, progress=False)
    before, after = job.perplexity["tinystories"]
    assert before < after < 1.2 * before
    assert job.info["sketched_modules"] == 14 and job.report.bits == 4 and job.sample
    assert (tmp_path / "sk" / "model.safetensors").is_file()
