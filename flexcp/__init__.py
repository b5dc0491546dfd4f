"""flexcp: context-parallel flexible attention for long-context fine-tuning.

Public API: the mask language (:class:`AttnMaskSpec`, :class:`AttnMaskType`) and
single-device attention over any slice mask (:func:`attention`). The distributed
runtime and the Hugging Face backend build on these.
"""

from .kernels import attention, available_backends
from .mask import AttnMaskSpec, AttnMaskType

__version__ = "0.1.0"

__all__ = ["AttnMaskSpec", "AttnMaskType", "attention", "available_backends", "__version__"]
