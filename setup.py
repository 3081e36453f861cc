"""Build and install eve_megatron, including the C++ extension in csrc/."""

import glob
import os

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError as exc:  # pragma: no cover - pyproject.toml lists pybind11 as build requirement
    raise SystemExit("pybind11 is needed to build eve_megatron (pip install pybind11)") from exc

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))

ext_modules = []
if SOURCES:
    ext_modules.append(
        Pybind11Extension(
            "eve_megatron._C",
            SOURCES,
            include_dirs=[os.path.join(HERE, "csrc")],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )

setup(
    name="eve_megatron",
    version="0.1.0",
    description="Megatron-Core trainer for encoder-free vision-language models (EVE family)",
    packages=find_packages(include=["eve_megatron", "eve_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        # both Megatron-Core releases require torch >= 2.6 (which has cp312 wheels: Python
        # 3.12 needs nothing newer); tested with 2.13.0 (CPU build on 3.11, CUDA build on 3.12)
        "torch>=2.6",
        # 0.16.1 on Python 3.11 (CI's default); the newest 0.19.x needs Python >= 3.12
        # (.ci/run's second pass). eve_megatron/mcore_compat.py checks the same range.
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core>=0.19,<0.20; python_version >= '3.12'",
        "numpy",
        "pillow>=10",
        "pyyaml",
        "tqdm",
        "safetensors",
        # tested at both ends: 4.45.2 (the official EVEv2 code's release) and the newest
        # (README's test command installs it; .ci/run re-runs the HF tests on 4.45.2)
        "transformers>=4.45.2",
        "sentencepiece",
        "tokenizers",
        "tensorboard",
        "psutil",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout"],
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
    entry_points={
        # the tools of eve_megatron/tools/ (also `python -m eve_megatron.tools.NAME`)
        "console_scripts": [
            "eve-preprocess=eve_megatron.tools.preprocess_data:main",
            "eve-import-hf=eve_megatron.tools.import_hf:main",
            "eve-export-hf=eve_megatron.tools.export_hf:main",
            "eve-copy-vision-branch=eve_megatron.tools.copy_vision_branch:main",
            "eve-generate=eve_megatron.tools.generate:main",
        ],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
