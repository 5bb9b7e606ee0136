"""t5g: encoder-decoder Gemma (T5Gemma) training by adaptation, in JAX/Flax."""

import setuptools

setuptools.setup(
    name="t5g",
    version="0.1.0",
    description="Train encoder-decoder LLMs adapted from Gemma 2 (T5Gemma) with JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["t5g", "t5g.*"]),
    package_data={"t5g.data": ["assets/*.model"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "seqio>=0.0.20",
        "tensorflow>=2.16",
        "tensorflow-datasets>=4.9",
        "tensorboard>=2.16",
        "sentencepiece>=0.2",
        "gin-config>=0.5",
        "ml_dtypes>=0.5",
        "numpy>=1.26",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "torch==2.13.0",
            "transformers>=5.0,<6",
            "safetensors>=0.4",
        ],
        # `t5g precompile`: libtpu, to compile for a TPU topology on a machine without one.
        "tpu-aot": ["jax[tpu]>=0.10,<0.11"],
    },
    entry_points={"console_scripts": ["t5g=t5g.cli:main"]},
)
