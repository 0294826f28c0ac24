"""SketchTune: compress a causal LM into fine-tunable sketches (codebooks + packed codes).

``import sketchtune`` registers the ``sketchtune`` quantization method with transformers, so
``AutoModelForCausalLM.from_pretrained(sketched_dir)`` rebuilds the sketched layers.
"""

__version__ = "0.1.0"

from .errors import SketchError  # noqa: E402
from .hf_integration import SketchTuneConfig, register as _register  # noqa: E402
from .sketched_linear import SketchedLinear  # noqa: E402
from .checkpoint import load, save  # noqa: E402
from .sketch.pipeline import sketch_model  # noqa: E402

_register()

__all__ = ["SketchError", "SketchTuneConfig", "SketchedLinear", "load", "save", "sketch_model", "__version__"]
