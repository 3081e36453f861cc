"""Data pipeline: preprocessing into indexed datasets, packing, and the packed Dataset.

Modules (import what you need; none imports torch except ``pixels``, ``dataset``, ``loader``):

- ``images``: decode, EXIF, RGB conversion (alpha onto white), AnyRatio resize, token count;
  EVEv1's student + teacher images (rules in ``hf/evev1_image_rules.py``)
- ``tokenizer``, ``templates``, ``segments``: HF / sentencepiece tokenizers; plain, qwen2,
  chatml (EVEv2), plain_bos, vicuna_v1 (EVEv1) + loss masks; segment tokenisation
- ``sources``, ``preprocess``: input readers and the offline preprocessing run
- ``preflight``: inputs, tokenizer and output checked before a run (all problems at once)
- ``indexed`` (+ ``indexed_format``): the ``PREFIX.bin`` / ``PREFIX.idx`` dataset format
- ``packing`` (+ ``packing_reference``): C++ pack index and blending, pure-Python twins
- ``dataset``, ``loader``: rows of the batch contract, collate, resumable sampler, DataLoader
"""
