"""Running fairseq as the launchers do: a config file's arguments, a free rendezvous port."""
import socket
from pathlib import Path
from typing import List

from ..moe.errors import MoEUsageError

# The checkout this package runs from: the experiments read configs/ and start scripts/ of it,
# which are not installed with the package (it is installed editable, `pip install -e .`).
REPO = Path(__file__).resolve().parents[2]


def config_args(path, flag: str = "--configs") -> List[str]:
    """The arguments of a launcher config (configs/*/*.args), as scripts/train.sh passes them:
    what `$(grep -v '^#' FILE)` gives the shell (whole-line comments dropped, whitespace split).
    A missing file is refused in one line naming `flag`."""
    path = Path(path)
    if not path.is_file():
        raise MoEUsageError(f"{flag}: no config {path}")
    return [tok for line in path.read_text().splitlines() if not line.startswith("#") for tok in line.split()]


def free_port() -> int:
    """A TCP port free on localhost now, for a process group's rendezvous (torchrun
    --master_port, init_process_group's tcp:// address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
