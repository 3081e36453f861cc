"""The prompt facts shared by training and every HF export: the image marker and its
placeholder id, the release's ``qwen2`` system prompt and its chat template.

Written once here: ``data.templates`` (training) and ``processing_eve_qwen2.py`` (the
exported processor) import them. Shipped in every export, so plain Python only.
"""

IMAGE_TOKEN = "<image>"
"""Marker of an image's place in a text."""
IMAGE_TOKEN_INDEX = -200
"""Id that marks image-token positions in HF ``input_ids`` (the release's placeholder)."""
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
QWEN2_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")

CHAT_TEMPLATE = (
    "{%- set system = namespace(text='" + QWEN2_SYSTEM.replace("'", "\\'") + "') -%}"
    "{%- macro text_of(content) -%}"
    "{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system.text = text_of(messages[0]['content']) -%}{%- endif -%}"
    "{{- system.text + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set text = text_of(message['content']) -%}"
    "{%- set n = text.count('<image>') -%}"
    "{%- if message['content'] is not string -%}"
    "{%- set n = n + (message['content'] | selectattr('type', 'equalto', 'image') | list | length) -%}"
    "{%- endif -%}"
    "{%- if n > 0 -%}{%- set text = text.replace('<image>', '') | trim -%}{%- endif -%}"
    "{{- 'USER: ' + '<image>\\n' * n + text + ' ASSISTANT:' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + text_of(message['content']) + '<|im_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
"""The release's ``qwen2`` template (NOT ChatML) as a Jinja chat template: ``{system} USER:
<image>\\n{q} ASSISTANT: {a}<|im_end|>USER: ...``; image parts and ``<image>`` markers of a
user turn move to its front, one ``<image>\\n`` each, as in training. A user turn always
ends with `` ASSISTANT:``, so ``add_generation_prompt`` changes nothing."""
