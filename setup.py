"""nxd_cp: context parallelism for NeuronX Distributed, with a torch.distributed fallback."""
from setuptools import find_packages, setup

setup(
    name="nxd_cp",
    version="0.1.0",
    description="Context parallelism (ring and all-gather attention) for NeuronX Distributed, "
    "running the same code on torch.distributed (NCCL, gloo)",
    packages=find_packages(include=["nxd_cp", "nxd_cp.*"]),
    package_data={"nxd_cp.plan": ["configs/*.json"]},  # the planner's shipped model configs
    python_requires=">=3.10",
    # The versions the private APIs of nxd_cp.compat are tested on (each module's SUPPORTED).
    install_requires=["torch>=2.9,<2.10"],
    extras_require={
        "hf": ["transformers>=4.57,<4.58"],
        "xla": ["torch-xla>=2.9,<2.10"],
        # The exact stack CI runs; scripts/setup.sh installs requirements-test.txt.
        "test": ["transformers==4.57.6", "torch-xla==2.9.0", "pytest==8.4.2", "numpy<2.3",
                 "matplotlib==3.10.7", "datasets==4.8.5", "tenacity==9.1.2", "boto3==1.40.76",
                 "botocore==1.40.76",
                 "jax==0.10.2", "jaxlib==0.10.2"],
    },
)
