"""megatron-selfjudge: label-free multimodal GRPO (MM-UPT majority vote and Actor-Judge) on megatron-core."""
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def _requirements(name: str) -> list[str]:
    lines = (HERE / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


setup(
    name="megatron-selfjudge",
    version="0.1.0",
    description="Label-free GRPO for multimodal LLMs: self-consistency and Actor-Judge rewards on megatron-core",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level kernels/ folder ships as megatron_selfjudge.kernels.
    packages=[
        "megatron_selfjudge",
        "megatron_selfjudge.rewards",
        "megatron_selfjudge.megatron",
        "megatron_selfjudge.megatron.models",
        "megatron_selfjudge.rollout",
        "megatron_selfjudge.data",
        "megatron_selfjudge.synth",
        "megatron_selfjudge.eval",
        "megatron_selfjudge.runtime",
        "megatron_selfjudge.kernels",
    ],
    package_dir={"megatron_selfjudge.kernels": "kernels"},
    package_data={"megatron_selfjudge": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "omegaconf==2.4.0",
        "math-verify==0.9.0",
        "numpy>=1.26",
        "safetensors>=0.4",
        "pyarrow>=15",
        "pillow>=10",
        "rich>=13",
        "tqdm>=4.66",
        "psutil>=5.9",
        "tensorboard>=2.15",
    ],
    extras_require={
        # CPU development and CI: exact pins live in requirements.txt.
        "test": ["pytest==9.0.1", "hypothesis==6.148.2", "triton==3.9.0"],
        # Inside an NGC PyTorch container torch, triton, apex and Transformer Engine are preinstalled.
        "gpu": ["liger-kernel==0.6.4"],
    },
    entry_points={"console_scripts": ["selfjudge=megatron_selfjudge.cli:main"]},
)
