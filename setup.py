"""Rosetta: distributed pre-training of multilingual Transformers."""

from setuptools import find_packages, setup

PACKAGES = ("pretrain", "data_pipeline", "parallel", "launch", "checkpoints_tools")

setup(
    name="rosetta",
    version="0.1.0",
    description="Distributed pre-training of multilingual dense and MoE Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=[p for name in PACKAGES for p in (name, f"{name}.*")]),
    include_package_data=True,
    package_data={"data_pipeline": ["sample/*", "sample/**/*"]},
    install_requires=[
        "torch>=2.9",
        "numpy",
        "pyyaml",
        "omegaconf>=2.3",
        "sentencepiece",
        "webdataset",
        "zstandard",
        "rich",
        "matplotlib",
        # BLEU / chrF of the back-translation loop (launch.backtranslation_loop)
        "sacrebleu>=2",
    ],
    # back-translation backends that need the model code (data_pipeline imports none of it)
    entry_points={"rosetta.translators": ["ckpt = pretrain.translator:checkpoint_translator"]},
    extras_require={
        "hf": ["transformers>=4.46", "safetensors", "peft"],
        "dev": ["pytest", "pytest-timeout", "ruff", "tensorboard"],
        # test-time only: the tests check our indexed-dataset files against megatron-core's own
        # reader and builder; 0.16.1 is the newest release for Python 3.11 (0.17+ need 3.12)
        "megatron": ["megatron-core==0.16.1"],
        # the optional ZeRO engine (parallel.engine=deepspeed); 0.19.8 measured with torch 2.13
        "deepspeed": ["deepspeed==0.19.8"],
    },
)
