"""What a MoE call computes besides its output: the one switch for auxiliary outputs."""
import enum


class AuxMode(enum.Enum):
    """Given to MoELayer.forward and Router.forward by the caller that knows what it will read.

    NONE:   the output only (generation: a decoder step routes a handful of rows, so losses and
            statistics would be most of its cost); routers skip their losses and any softmax
            kept for statistics alone.
    LOSSES: the weighted auxiliary losses, no routing statistics.
    ALL:    losses and statistics (training and validation log both; moe-prune's usage count).
    """

    NONE = "none"
    LOSSES = "losses"
    ALL = "losses+stats"

    @property
    def losses(self) -> bool:
        return self is not AuxMode.NONE

    @property
    def stats(self) -> bool:
        return self is AuxMode.ALL

    @classmethod
    def of(cls, value) -> "AuxMode":
        """An AuxMode from itself or its name ("none", "losses", "losses+stats"), or a one-line error."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"aux_mode must be one of {', '.join(m.value for m in cls)} (got {value!r})") from None


def default_aux_mode(training: bool) -> AuxMode:
    """Training computes everything (the criterion reads losses and logs statistics); evaluation
    nothing unless a caller asks (validation and usage counts do, generation does not)."""
    return AuxMode.ALL if training else AuxMode.NONE
