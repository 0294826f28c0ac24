"""Sketch models larger than memory: built on the meta device, one decoder layer's weights read at a time.

:class:`StreamedModel` opens a Hugging Face model directory without loading its weights: the model is built
with ``accelerate.init_empty_weights`` (parameters on the meta device, buffers such as rotary tables real),
the embeddings and final norm are read from the safetensors shards, and each decoder layer is read just
before :func:`~sketchtune.sketch.pipeline.sketch_model` sketches it and dropped back to meta as soon as it is
written to the run's progress directory. Tensors are renamed and fused exactly as ``from_pretrained`` does
(transformers' own conversion mapping, e.g. per-expert MoE weights into fused experts), one layer's keys at a
time. :func:`write_streamed_checkpoint` then assembles the finished layers into a sharded checkpoint (one shard
per decoder layer, plus one for the rest, with a ``save_pretrained``-style index), again one layer in memory.

Peak memory ≈ one dense decoder layer in the compute dtype + its sketch and Hessians + calibration states —
independent of depth. The embeddings (kept in the checkpoint's 16-bit dtype) are in memory only while the
calibration inputs are captured; the LM head is never needed for calibration (the forward stops at the last
layer). Both are read again from the source shards when the checkpoint is written. GGUF files are not streamed:
transformers dequantizes them whole on load.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..architecture import find_decoder_layers
from ..checkpoint import DTYPES, check_output_dir, weight_files, write_atomically
from ..errors import SketchError
from ..naming import stored_key
from .calibration import map_large_allocations, return_freed_memory
from .progress import layer_path


class StreamedModel:
    """A causal LM whose decoder layers stay on disk until :meth:`load_layer` asks for one."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        self.path = Path(path).expanduser()
        if self.path.suffix == ".gguf" or not self.path.is_dir():
            raise SketchError(f"--stream needs a model directory with safetensors shards, not {self.path} "
                              "(GGUF files are dequantized whole by transformers: drop --stream)")
        self.files = _shards(self.path)
        self.dtype = dtype
        map_large_allocations()  # streaming is for when memory is short: keep freed blocks from staying resident
        config = AutoConfig.from_pretrained(str(self.path))
        config._name_or_path = str(self.path)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        self.prefix, layers = find_decoder_layers(self.model)
        self.conversions = get_model_conversion_mapping(self.model)
        renamings = [c for c in self.conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in self.conversions if isinstance(c, WeightConverter)]
        targets = self.model.state_dict()
        self.head = head = _output_embedding_name(self.model)
        # checkpoint key -> its shard, grouped by the decoder layer it lands in (None: outside the layers)
        self.keys: dict[int | None, dict[str, Path]] = {}
        self.head_keys: dict[str, Path] = {}
        for file in self.files:
            with safe_open(str(file), framework="pt") as st:
                for key in st.keys():
                    target, _ = rename_source_key(key, renamings, converters, self.model.base_model_prefix, targets)
                    if head and target.startswith(head + "."):
                        self.head_keys[key] = file
                        continue
                    self.keys.setdefault(_layer_index(target, self.prefix, len(layers)), {})[key] = file
        self.loaded: set[int] = set()
        self._outside_loaded = False
        self._upcast = None  # the embeddings' forward hook handing the layers compute-dtype states

    def load_outside(self) -> None:
        """Read the embeddings and the other tensors outside the decoder layers (not the untied LM head).

        Done on first use rather than on opening, so that the calibration text is tokenized (a transient few
        hundred MB) before the embedding table is in memory, not on top of it.
        """
        if self._outside_loaded:
            return
        config, dtype = self.model.config, self.dtype
        # The embeddings stay in the checkpoint's own (usually 16-bit) dtype and hand the layers their output in
        # the compute dtype: the same numbers as upcasting the table, at half its memory.
        stored = _stored_dtype(*next(iter(self.keys.get(None, {}).items()), (None, None)))
        keep = stored if stored is not None and stored.itemsize < dtype.itemsize else dtype
        for name, p in self.model.named_parameters():
            if not name.startswith(self.prefix + "."):  # transformers loads into the dtype of the (meta) target
                p.data = p.data.to(keep)
        self._load(self.keys.get(None, {}), self.model, "the embeddings")
        if getattr(config.get_text_config(), "tie_word_embeddings", False):
            inp, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
            if inp.weight.is_meta and out is not None and not out.weight.is_meta:
                inp.weight = out.weight  # the checkpoint stored the shared table under the LM head's name
            self.model.tie_weights()
        if keep != dtype and self._upcast is None:
            self._upcast = self.model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.to(dtype))
        self._outside_loaded = True

    def release_outside(self) -> None:
        """Drop the embeddings once the calibration inputs are captured: the layers never read them again, and
        :func:`write_streamed_checkpoint` reads them anew. A 49k × 2048 bf16 table is 192 MB of peak memory."""
        for name, module in self.model.named_modules():
            if name == self.prefix or name.startswith(self.prefix + "."):
                continue
            for key, p in module._parameters.items():
                if p is not None and not p.is_meta:
                    module._parameters[key] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        self._outside_loaded = False
        return_freed_memory()

    def load_layer(self, index: int, layer: nn.Module) -> None:
        """Read decoder layer ``index``'s weights from the shards into ``layer`` (a no-op when already read).

        Only the layer: the embeddings are read by :meth:`load_outside`, once, for the calibration capture.
        """
        if index not in self.loaded:
            self._load(self.keys.get(index, {}), layer, f"{self.prefix}.{index}")
            self.loaded.add(index)

    def release_layer(self, index: int, layer: nn.Module) -> None:
        """Drop the layer's tensors back to the meta device; it has been written out."""
        layer.to("meta")
        self.loaded.discard(index)
        return_freed_memory()

    def release_head(self) -> None:
        """Drop the LM head read by :meth:`head_tensors` back to the meta device."""
        if self.head:
            self.model.get_submodule(self.head).to("meta")
        return_freed_memory()

    def _load(self, keys: dict[str, Path], scope: nn.Module, what: str) -> None:
        """Read ``keys`` through transformers' own renaming/fusing; each lands in the dtype of its meta target."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        with ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in set(keys.values())}
            slices = {k: handles[f].get_slice(k) for k, f in keys.items()}
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                convert_and_load_state_dict_in_model(
                    self.model, slices, LoadStateDictConfig(dtype=self.dtype, weight_mapping=self.conversions))
            except Exception as e:  # transformers raises many types for a tensor that does not fit
                raise SketchError(f"--stream: cannot load {what} from {self.path} ({str(e).splitlines()[0]})") from None
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
        missing = [n for n, p in scope.named_parameters() if p.is_meta]
        if missing and scope is not self.model:
            raise SketchError(f"--stream: {self.path} has no tensor for {what}.{missing[0]} "
                              f"({len(missing)} missing in this layer)")

    def head_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The untied output embeddings, read now (they were never needed for calibration)."""
        if not self.head_keys:
            return {}
        head = self.model.get_submodule(self.head)
        head.to(dtype)  # still on meta: sets the dtype it is read into
        self._load(self.head_keys, self.model, "the LM head")
        return {f"{self.head}.{k}": t.detach().contiguous() for k, t in head.state_dict().items()}


def write_streamed_checkpoint(
    streamed: StreamedModel, progress_dir: str | os.PathLike, tokenizer, out_dir: str | os.PathLike,
    dtype: torch.dtype | str = "float16", overwrite: bool = False,
) -> Path:
    """Assemble the sketched layers in ``progress_dir`` (:mod:`.progress`) into a sharded checkpoint at ``out_dir``, a layer at a time.

    Layout is ``save_pretrained``'s: ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``,
    so ``from_pretrained`` and :func:`sketchtune.load` read it like any other sketched checkpoint.
    """
    out = check_output_dir(out_dir, overwrite).resolve()
    model = streamed.model
    if getattr(model.config, "quantization_config", None) is None:
        raise SketchError("model has no sketchtune quantization_config; sketch it first")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    prefix = streamed.prefix
    layers = model.get_submodule(prefix)  # sketched by now: no nn.Linear left for find_decoder_layers to see
    n = len(layers) + 1 + bool(streamed.head_keys)  # the untied LM head gets a shard of its own

    def cast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}

    model_type = getattr(model.config, "model_type", None)

    def write(tmp: Path) -> None:
        weight_map: dict[str, str] = {}
        total = 0

        def shard(number: int, tensors: dict[str, torch.Tensor]) -> None:
            nonlocal total
            tensors = {stored_key(k, model_type): t for k, t in tensors.items()}  # as save_pretrained names them
            name = f"model-{number:05d}-of-{n:05d}.safetensors"
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(t.numel() * t.element_size() for t in tensors.values())

        for i in range(len(layers)):
            tensors = load_file(str(layer_path(progress_dir, i)))
            shard(i + 1, cast({f"{prefix}.{i}.{k}": t for k, t in tensors.items()}))
        for layer in layers:  # calibration is over: make room for the embeddings and the LM head
            layer.to("meta")
        streamed.load_outside()  # released after calibration (or never read, resuming a finished run)
        rest, seen = {}, set()
        for name, t in model.state_dict(keep_vars=True).items():
            if name.startswith(prefix + ".") or t.is_meta or id(t) in seen:
                continue  # layers are written; a tied tensor is saved once, under its first name
            seen.add(id(t))
            rest[name] = t.detach().contiguous()
        rest = cast(rest)
        streamed.release_outside()  # only the cast copies are kept: the stored table never meets the head
        shard(len(layers) + 1, rest)
        del rest
        return_freed_memory()
        head = streamed.head_tensors(dtype)
        if head:
            shard(n, cast(head))
            del head  # before the release, so that its trim can hand the table back
            streamed.release_head()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        model.config.dtype = dtype
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_atomically(out, write)


def _shards(path: Path) -> list[Path]:
    files = weight_files(path, what=str(path))
    if not (path / "model.safetensors.index.json").is_file() and not files[0].is_file():
        raise SketchError(f"--stream needs safetensors weights; {path} has none (load it whole: drop --stream)")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SketchError(f"{path}: weight shard {missing[0]} is missing")
    return files


def _stored_dtype(key: str | None, file: Path | None) -> torch.dtype | None:
    """The dtype ``key`` is stored in, from the safetensors header of its shard (``None`` without a key)."""
    if key is None:
        return None
    with safe_open(str(file), framework="pt") as st:
        return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(st.get_slice(key).get_dtype())


def _layer_index(key: str, prefix: str, count: int) -> int | None:
    if not key.startswith(prefix + "."):
        return None
    head = key[len(prefix) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() and int(head) < count else None


def _output_embedding_name(model: nn.Module) -> str | None:
    """Module name of the untied LM head, or None when it shares the input embeddings' weight."""
    head = model.get_output_embeddings()
    if head is None:
        return None
    inp = model.get_input_embeddings()
    if inp is not None and head.weight is inp.weight:
        return None
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return None
    return next((n for n, m in model.named_modules() if m is head), None)
