"""Data pipeline: preprocessing into indexed datasets, packing, and the packed Dataset.

Modules (import what you need; none imports torch except ``pixels``, ``dataset``, ``loader``):

- ``images``: decode, EXIF, RGB conversion (alpha onto white), AnyRatio resize, token count
- ``tokenizer``, ``templates``: HF / sentencepiece tokenizers; plain, qwen2, chatml + loss masks
- ``sources``, ``preprocess``: input readers and the offline preprocessing run
- ``preflight``: inputs, tokenizer and output checked before a run (all problems at once)
- ``indexed``: the ``PREFIX.bin`` / ``PREFIX.idx`` dataset format
- ``packing`` (+ ``packing_reference``): C++ pack index and blending, pure-Python twins
- ``dataset``, ``loader``: rows of the batch contract, collate, resumable sampler, DataLoader
"""
