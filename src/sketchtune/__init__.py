"""SketchTune: compress a causal LM into fine-tunable sketches (codebooks + packed codes).

``import sketchtune`` registers the ``sketchtune`` quantization method with transformers, so
``AutoModelForCausalLM.from_pretrained(sketched_dir)`` rebuilds the sketched layers.

Modules, bottom to top (each imports only those before it): ``errors``, ``version``, ``layout`` (the format),
``kernels``, ``sketched_linear`` (the layer), ``architecture``, ``hf_integration``, ``checkpoint``,
``modeling`` (loading), ``sketch`` / ``train`` / ``eval`` / ``analysis`` (pipelines), ``workflows``, ``cli``.
"""

from .checkpoint import load, save
from .errors import SketchError
from .hf_integration import SketchTuneConfig
from .hf_integration import register as _register
from .sketch.pipeline import sketch_model
from .sketched_linear import SketchedLinear
from .version import __version__

_register()

__all__ = ["SketchError", "SketchTuneConfig", "SketchedLinear", "load", "save", "sketch_model", "__version__"]
