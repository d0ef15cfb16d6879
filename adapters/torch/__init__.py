"""PyTorch adapters: retraining with the papers' methods, then onnxprune's surgery.

Requires the optional extra: `pip install onnxprune[torch]`. The adapters are thin:
groups, scores and surgery are onnxprune's; the adapters map them onto torch
parameters (mapping.py) and run the training-time steps.

- SoftFilterPruner: SFP, ASFP and FPGM's training (soft.py)
- TaylorCollector, TaylorPruner: stored gradients and the iterative schedule (taylor.py)
- FilterSkeleton: stripe-wise pruning, SWP (swp.py)
- HierarchicalGroupSparsity, prune_with_hgsr: HGSR regularization and flow (hgsr.py)
- OnnxModule, finetune: train any ONNX model in torch and write the weights back
- recalibrate_batchnorm: fresh BN running statistics after pruning steps (batchnorm.py)
"""

from __future__ import annotations

_EXPORTS = {
    "SoftFilterPruner": "soft", "asfp_rate": "soft",
    "TaylorCollector": "taylor", "TaylorPruner": "taylor",
    "FilterSkeleton": "swp", "fold_skeletons": "swp",
    "HierarchicalGroupSparsity": "hgsr", "prune_with_hgsr": "hgsr",
    "OnnxModule": "onnx_module", "finetune": "finetune",
    "TorchGroups": "mapping", "export_preserving_names": "mapping",
    "recalibrate_batchnorm": "batchnorm",
}
__all__ = [*_EXPORTS, "swp_export"]


def __getattr__(name: str):
    """Import lazily, so `import onnxprune.adapters.torch` stays cheap."""
    from importlib import import_module

    if name == "swp_export":  # swp.export, under a name that says what it exports
        return import_module(f"{__name__}.swp").export
    if name not in _EXPORTS:
        raise AttributeError(name)
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
