"""Imported first by the Python scripts here (`import _bootstrap`), so that `python scripts/X.py`
runs this checkout's moe_fairseq from the repository root without PYTHONPATH, whether the package
is installed or not (and not another checkout's when one is).  Python puts scripts/ itself on
sys.path when it runs a script, which is how this module is found.  The scripts are thin entry
points; what they run is moe_fairseq/experiments/."""
import sys
from pathlib import Path

CHECKOUT = str(Path(__file__).resolve().parents[1])
if CHECKOUT not in sys.path:
    sys.path.insert(0, CHECKOUT)
