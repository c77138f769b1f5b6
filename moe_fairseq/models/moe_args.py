"""Command-line flags of the MoE model, and their translation into the layer library's MoEConfig,
all generated from dataclass fields (moe.config.option): MoEConfig's for the options of a MoE
layer, MoEModelOptions' below for where the layers go.  Nothing here names a single option.

Flag names follow fairseq's `moe`/`nllb` branches where the concept is the same
(--moe-expert-count, --moe-freq, --moe-second-expert-policy, --moe-gate-loss-wt, ...), so their
users find what they know.
"""
import typing
from dataclasses import dataclass, fields
from typing import FrozenSet, Optional, Tuple

from ..moe.config import ALIASES, MoEConfig, check_fields, config_values, dest_flag, flag_dest, option
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

    @classmethod
    def from_args(cls, args) -> "MoEModelOptions":
        """The options in fairseq's args; one not there (a checkpoint older than its flag) is its default."""
        values = {f.name: getattr(args, f.metadata["dest"], None) for f in fields(cls)}
        return cls(**{name: value for name, value in values.items() if value is not None})

    def validate(self, num_experts: int, encoder_layers: int, decoder_layers: int) -> "MoEModelOptions":
        """The options' rules for a model of num_experts (--moe-expert-count) experts, each error
        one line naming the flag; returns self."""
        check_fields(self)
        if num_experts < 0:
            raise MoEUsageError(f"--moe-expert-count must be >= 0 (got {num_experts})")
        if num_experts == 0:
            for name in ("moe_freq", "encoder_moe_freq", "decoder_moe_freq"):  # where MoE layers go
                if getattr(self, name):
                    raise MoEUsageError(f"{dest_flag(name)}={getattr(self, name)} needs --moe-expert-count > 0")
            return self
        self.moe_layers(num_experts, encoder_layers, decoder_layers)
        if self.moe_split_ffn and self.moe_expert_ffn_dim:
            raise MoEUsageError("--moe-split-ffn and --moe-expert-ffn-dim are exclusive")
        return self

    def moe_layers(self, num_experts: int, encoder_layers: int, decoder_layers: int) -> Tuple[FrozenSet[int], ...]:
        """(encoder, decoder) indices of the MoE layers: layers i with (i + 1) % freq == 0 (fairseq's
        moe branch rule), none for a dense model (num_experts 0)."""
        out = []
        for side, num_layers in (("encoder", encoder_layers), ("decoder", decoder_layers)):
            freq, flag = getattr(self, f"{side}_moe_freq"), f"--{side}-moe-freq"
            if freq is None:
                freq, flag = self.moe_freq, "--moe-freq"
            if not num_experts or not freq:
                out.append(frozenset())
                continue
            if freq < 0 or freq > num_layers:
                raise MoEUsageError(f"{flag}={freq} must be between 0 and the number of layers ({num_layers})")
            out.append(frozenset(i for i in range(num_layers) if (i + 1) % freq == 0))
        return tuple(out)


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
    """The MoEConfig of fairseq's args (aliases resolved; validated when made)."""
    return MoEConfig(**config_values(lambda dest: getattr(args, dest, None)))
