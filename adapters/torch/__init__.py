"""PyTorch adapters (soft pruning, filter skeletons, regularizers, fine-tuning).

Not written yet: see the open issue on PyTorch adapters. Importing this package
requires the optional extra: `pip install onnxprune[torch]`.
"""
