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
        "torch>=2.4",
        "megatron-core==0.16.1",
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
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
