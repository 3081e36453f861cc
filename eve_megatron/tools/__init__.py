"""The command-line tools, as modules (``python -m eve_megatron.tools.NAME``) and, once the
package is installed, console scripts:

- ``preprocess_data`` (``eve-preprocess``): raw inputs -> indexed dataset (``eve_megatron.data``)
- ``import_hf`` (``eve-import-hf``): Hugging Face folder -> Megatron checkpoint
- ``export_hf`` (``eve-export-hf``): Megatron checkpoint -> Hugging Face EVE folder
- ``copy_vision_branch`` (``eve-copy-vision-branch``): the EVEv2 copy step (stage 0 -> 1)
- ``generate`` (``eve-generate``): answer a prompt with an exported folder

Each module has ``main(argv=None) -> int`` (the exit status). ``tools/preprocess/``,
``tools/checkpoint/`` and ``tools/generate.py`` are thin wrappers calling these, kept so the
old paths keep working from a source checkout.
"""
