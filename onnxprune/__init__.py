"""onnxprune: structured (filter/channel) pruning of ONNX models.

The pipeline, each stage usable alone:
load → analyze (channel groups) → score → plan → apply (surgery) → validate → report
"""

from .analyze import Analysis, Group, analyze
from .apply import Surgery, apply
from .load import load_model, load_normalized, normalize, save_model
from .plan import select
from .score import score

__version__ = "0.1.0"
__all__ = ["Analysis", "Group", "Surgery", "analyze", "apply", "load_model", "load_normalized",
           "normalize", "save_model", "score", "select", "__version__"]
