from setuptools import find_packages, setup

setup(
    name="moe-fairseq",
    version="0.1.0",
    description="Mixture-of-Experts layers, routers and regularisers (Shazeer 2017, Switch, GShard, "
                "Gating Dropout, SMoE-Dropout) for fairseq multilingual translation, with expert parallelism",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["moe_fairseq", "moe_fairseq.*", "data_prep", "data_prep.*"]),
    python_requires=">=3.8",
    # torch is installed first and explicitly (see README): a bare requirement with no torch
    # present would download a multi-GB CUDA build.
    install_requires=[
        "torch>=2.4",  # moe_fairseq/moe/torch_version.py
        "fairseq==0.12.2; python_version < '3.11'",
        # fairseq 0.12.2 does not import on Python 3.11+ (dataclass mutable default); this is a
        # drop-in build of the same code that imports as `fairseq`.
        "fairseq-fixed==0.12.3.1; python_version >= '3.11'",
        "sacrebleu>=2.0",
        "sentencepiece>=0.1.97",
        "fairscale>=0.4",
        "numpy",
        "matplotlib",
        "tensorboardX",
    ],
    # data: `moe-prepare --wmt10` fetches the corpora with mtdata.
    # bench-peers: the MoE layers scripts/bench_moe_peers.py compares with, never needed by the
    # plugin; install them in an environment of their own (they may ask for another torch).
    # triton: torchtitan 0.3 imports it at import time, and only CUDA builds of torch bring it.
    extras_require={"test": ["pytest>=7"], "data": ["mtdata>=0.4"],
                    "bench-peers": ["deepspeed>=0.19", "torchtitan>=0.3", "triton>=3"]},
    entry_points={
        # moe_fairseq.console silences fairscale's import-time FutureWarnings, then runs the
        # module's cli_main
        "console_scripts": [
            "moe-consolidate=moe_fairseq.console:consolidate",
            "moe-reshard=moe_fairseq.console:reshard",
            "moe-prune=moe_fairseq.console:prune",
            "moe-average=moe_fairseq.console:average",
            "moe-evaluate=moe_fairseq.console:evaluate",
            "moe-prepare=moe_fairseq.console:prepare",
            "moe-quantize=moe_fairseq.console:quantize",
        ]
    },
)
