"""Hugging Face side: the Megatron <-> HF name table, checkpoint import/export, the HF EVE model.

- ``mapping``: the one declarative name table (fused q/k/v and [gate; up] helpers);
- ``config_map``: architecture <-> ``config.json`` / ``preprocessor_config.json``;
- ``export`` / ``importer``: Megatron checkpoint -> HF folder (streaming) and back;
- ``configuration_eve_qwen2`` / ``modeling_eve_qwen2``: ``EVEQwen2ForCausalLM``, copied into
  every export for ``trust_remote_code`` (they depend on ``transformers`` only);
- ``processing`` / ``generation``: inference resize, prompts, greedy answers.
"""
