from setuptools import find_packages, setup

setup(
    name="iwm-engine",
    version="0.1.0",
    description="Image World Models (IWM): JEPA world-model pretraining on DeepSpeed with fused Triton kernels",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "timm==1.0.31",
        "deepspeed==0.19.8",
        "numpy==2.4.6",
        "pillow==13.0.0",
        "tqdm==4.70.1",
        "matplotlib==3.11.2",
        "tensorboard==2.21.0",
    ],
    extras_require={
        # triton ships with the CUDA build of torch 2.14.1 (3.8.0); named here for clarity
        "test": ["pytest==9.2.0", "pytest-benchmark==5.3.1"],
        "dev": ["pytest==9.2.0", "pytest-benchmark==5.3.1"],
        # GPU-only: memory-efficient ragged attention (no CPU kernels)
        "xformers": ["xformers==0.0.35"],
    },
)
