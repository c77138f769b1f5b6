"""Command-line flags of the MoE model, and their translation into the layer library's MoEConfig,
all generated from dataclass fields (moe.config.option): MoEConfig's for the options of a MoE
layer, MoEModelOptions' below for where the layers go.  Nothing here names a single option
except the aliases table.

Flag names follow fairseq's `moe`/`nllb` branches where the concept is the same
(--moe-expert-count, --moe-freq, --moe-second-expert-policy, --moe-gate-loss-wt, ...), so their
users find what they know.
"""
import typing
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

from ..moe.config import MoEConfig, flag_dest, option
from ..moe.errors import MoEUsageError


@dataclass
class MoEModelOptions:
    """Flags of the transformer_moe model that are not options of a MoE layer."""

    moe_freq: int = option(
        0, "--moe-freq", "every N-th FFN (layers i with (i+1) %% N == 0) of encoder and decoder is MoE; 0 = none",
        metavar="N")
    encoder_moe_freq: Optional[int] = option(
        None, "--encoder-moe-freq", "as --moe-freq, encoder only (overrides it)", metavar="N")
    decoder_moe_freq: Optional[int] = option(
        None, "--decoder-moe-freq", "as --moe-freq, decoder only (overrides it)", metavar="N")
    # fairseq's moe branch switches fp32 gating on with this flag; here routing is always fp32
    # (docs/reference.md, tests/test_precision.py), so the switch is accepted and changes nothing.
    # Its default is False, the value every command line without it has always stored.
    moe_gating_use_fp32: bool = option(
        False, "--moe-gating-use-fp32", "accepted for fairseq moe-branch command lines and ignored: routers "
                                        "always compute in fp32")
    moe_expert_ffn_dim: Optional[int] = option(
        None, "--moe-expert-ffn-dim", "hidden size of each expert (default: the FFN dim)")
    moe_split_ffn: bool = option(
        False, "--moe-split-ffn", "experts of hidden size FFN/E: the parameters of one dense FFN (SMoE-Dropout)")


class Alias(NamedTuple):
    field: str  # the MoEConfig field it sets
    value: object  # a switch's value (the flag takes no argument), or None: the flag carries one
    help: str
    metavar: Optional[str] = None


# Other fairseq branches' spellings of our options.  A switch wins over the field's own flag (as
# --moe-top1-expert always meant top1); an alias carrying a value is used when the field's own
# flag is not given.
ALIASES = {
    "--moe-top1-expert": Alias("router", "top1", "fairseq moe-branch spelling of --moe-router top1"),
    "--moe-local-drop": Alias("gating_dropout", None, "fairseq nllb-branch spelling of --moe-gating-dropout with "
                                                      "gate_drop", "P"),
}


def _argparse_type(annotation):
    """int for int and Optional[int], ...; None for str (argparse's default) and bool (a switch)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    return None if base in (str, bool) else base


def flag_fields(scope: str):
    """The fields of MoEConfig and MoEModelOptions that are flags of `scope` ("model" or "task")."""
    for f in fields(MoEConfig) + fields(MoEModelOptions):
        if f.metadata["flag"] is not None and f.metadata["scope"] == scope:
            yield f


def add_flags(group, scope: str = "model"):
    """Add the flags of `scope` ("model" or "task", see moe.config.option) to an argparse group."""
    for f in flag_fields(scope):
        meta = f.metadata
        kwargs = dict(help=meta["help"])
        if f.type is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs.update((k, v) for k, v in (("type", _argparse_type(f.type)), ("choices", meta["choices"]),
                                              ("metavar", meta["metavar"])) if v is not None)
        group.add_argument(meta["flag"], **kwargs)
        for flag, alias in ALIASES.items():
            if alias.field == f.name:
                if alias.value is not None:
                    group.add_argument(flag, action="store_true", help=alias.help)
                else:
                    group.add_argument(flag, type=kwargs.get("type"), metavar=alias.metavar, help=alias.help)


def add_moe_args(parser):
    add_flags(parser.add_argument_group("Mixture of Experts"))


def set_moe_defaults(args):
    """Defaults applied by the architectures (fairseq's getattr idiom keeps explicit flags)."""
    defaults = {f.metadata["dest"]: f.metadata["arg_default"] for f in flag_fields("model")}
    defaults.update((flag_dest(flag), False if alias.value is not None else None) for flag, alias in ALIASES.items())
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def moe_config_from_args(args) -> MoEConfig:
    values = {}
    for f in fields(MoEConfig):
        meta = f.metadata
        value = getattr(args, meta["dest"], None)
        for flag, alias in ALIASES.items():
            if alias.field != f.name:
                continue
            given = getattr(args, flag_dest(flag), None)
            if alias.value is not None and given:  # a switch, given
                value = alias.value
            elif alias.value is None and value is None:  # the field's own flag not given
                value = given
        if value is None and meta["inherit"]:
            value = getattr(args, meta["inherit"], None)
        values[f.name] = f.default if value is None else value
    return MoEConfig(**values)


def moe_layer_indices(freq: int, num_layers: int, flag: str):
    """Layers i with (i + 1) % freq == 0 (fairseq's moe branch rule)."""
    if not freq:
        return set()
    if freq < 0 or freq > num_layers:
        raise MoEUsageError(f"{flag}={freq} must be between 0 and the number of layers ({num_layers})")
    return {i for i in range(num_layers) if (i + 1) % freq == 0}
