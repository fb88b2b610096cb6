"""int4 with the tensors whose names match REGEX stored int8 instead (the joint pass and the
codec chosen per tensor): what mixed precision would buy. usage: mixed-sim.py REGEX [bench quality
args]; prints the int8 share of the quantized elements."""
import re, sys
from endor.convert import pipeline as pl

PATTERN = re.compile(sys.argv[1])
_prune, _quantize = pl._Conversion._prune, pl._Conversion._quantize
WIDE = {"n": 0, "all": 0}

def with_values(f):
    def run(self, name, *a, **k):
        saved = self.values
        if PATTERN.search(name):
            self.values = "int8"
        try:
            return f(self, name, *a, **k)
        finally:
            self.values = saved
    return run

pl._Conversion._prune = with_values(_prune)
def _q(self, name, t):
    WIDE["all"] += t.numel()
    if PATTERN.search(name):
        WIDE["n"] += t.numel()
    return with_values(_quantize)(self, name, t)
pl._Conversion._quantize = _q

from endor.cli import main
sys.argv = ["endor", "bench", "quality"] + sys.argv[2:]
try:
    main()
finally:
    print("int8 fraction of quantized elements:", WIDE["n"] / max(WIDE["all"], 1), WIDE, file=sys.stderr)
