"""slime-xvocab: cross-tokenizer on-policy distillation for slime."""

from setuptools import find_packages, setup

setup(
    name="slime-xvocab",
    version="0.1.0",
    description="On-policy distillation across tokenizers for the slime RL framework",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["slime_xvocab", "slime_xvocab.*"]),
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.24",
        "transformers>=4.51",
        "tokenizers>=0.21",
        "httpx>=0.27",
        "aiohttp>=3.9",
        "pyyaml>=6",
        "rich>=13",
    ],
    extras_require={
        # The reference teacher server and the CPU demo run small models with torch.
        # Install torch yourself first (`pip install torch`), so pip does not pick a CUDA build for you.
        "demo": ["torch>=2.1", "matplotlib>=3.7", "accelerate>=0.30", "gguf>=0.10", "sentencepiece", "protobuf"],
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "sglang-router>=0.3.2",
            "tiktoken>=0.7",
            "mistral-common>=1.5",
            "pandas",
            "pyarrow",
        ],
    },
    entry_points={"console_scripts": ["slime-xvocab=slime_xvocab.cli:main"]},
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
    ],
)
