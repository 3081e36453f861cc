"""Hugging Face side: the Megatron <-> HF name table, checkpoint import/export, the HF EVE model.

- ``mapping``: the one declarative name table (fused q/k/v and [gate; up] helpers);
- ``config_map``: architecture <-> ``config.json`` / ``preprocessor_config.json``;
- ``export`` / ``export_files`` / ``importer``: Megatron checkpoint -> HF folder (streaming)
  and back;
- shipped in every export (transformers, torch, numpy, PIL only): ``configuration_eve_qwen2``,
  ``modeling_eve_qwen2``, ``eve_layers``, ``eve_generation``, ``eve_image_rules``, ``eve_prompt``,
  ``image_processing_eve_qwen2``, ``processing_eve_qwen2``;
- ``processing`` / ``generation``: training-exact prompts, greedy answers (``tools/generate.py``);
- EVEv1 (EVE-7B-v1.0 layout): ``mapping_evev1`` (its name table; the weight list is
  ``models/evev1/weights.py``), ``config_map_evev1``, ``export_files_evev1``; shipped: ``configuration_eve_llama``,
  ``modeling_eve_llama``, ``evev1_layers``, ``evev1_image_rules``, ``image_processing_eve_llama``.
"""
