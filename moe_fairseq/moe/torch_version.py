"""The oldest torch the layer library runs on, checked once with a one-line error.

torch 2.4 is the first with the device-generic autocast API the layers use
(`torch.is_autocast_enabled(device_type)`, `torch.get_autocast_dtype`); with 2.1-2.3 the first
forward would fail with a TypeError deep inside a MoE layer instead.
"""
import torch

from .errors import MoEUsageError

MIN_TORCH = (2, 4)


def parse_version(version: str):
    """(major, minor) of a torch version string such as '2.4.1+cu121' or '2.6.0a0+git1234'."""
    parts = version.split("+")[0].split(".")
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts[:2])


def check_torch_version(version: str = None):
    version = torch.__version__ if version is None else version
    if parse_version(version) < MIN_TORCH:
        raise MoEUsageError(f"moe_fairseq needs torch >= {'.'.join(map(str, MIN_TORCH))} (found {version}): "
                            f"pip install 'torch>={'.'.join(map(str, MIN_TORCH))}' (see scripts/setup_env.sh)")
