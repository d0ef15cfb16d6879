"""Framework adapters, importable as `onnxprune.adapters` (e.g. `onnxprune.adapters.torch`).

The core never imports a framework; adapters are optional extras.
"""
