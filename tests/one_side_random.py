"""
A research-only variant (not a test): Mix-and-Match's Sampling redrawn on one side only, the fixed
split (the first alpha indices, the paper's deterministic baseline) on the other. It tells which
side's redrawing makes the model rely on z less (samples/README.md, "Which side's redrawing costs
z?"); tests/reproduce_results.py --section mechanism trains and measures through it:

    python3 tests/one_side_random.py decoder train.py --data-root ../shared/data --decoder autoregressive
    python3 tests/one_side_random.py decoder sample.py --checkpoint ... --metrics

"decoder": the decoder's Resampling gets a fresh I every pass, the encoder's the fixed one;
"encoder": the reverse. Its checkpoints say conditioning "mix-and-match", as the variant is not one
of model.py's: measure them through this script with the same side, never with sample.py alone.
"""
import contextlib
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from model import MixAndMatchCVAE

SIDES = ("decoder", "encoder")  # the side whose Sampling is redrawn
SCRIPTS = ("train.py", "sample.py")


@contextlib.contextmanager
def one_side_random(side):
    """While inside, every MixAndMatchCVAE redraws its Sampling on `side` only: the other side's
    Resampling (encode or decode) is given the fixed split in place of the drawn one."""
    name = "encode" if side == "decoder" else "decode"
    method = getattr(MixAndMatchCVAE, name)

    def with_fixed_split(self, x, condition_h, sampled_indices, *args, **kwargs):
        if sampled_indices is None:
            sys.exit("error: one_side_random.py varies Mix-and-Match: it needs --conditioning mix-and-match "
                     "(concat draws no Sampling)")
        fixed = torch.arange(len(sampled_indices), device=sampled_indices.device)  # as conditioning "fixed"
        return method(self, x, condition_h, fixed, *args, **kwargs)

    setattr(MixAndMatchCVAE, name, with_fixed_split)
    try:
        yield
    finally:
        setattr(MixAndMatchCVAE, name, method)


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in SIDES or sys.argv[2] not in SCRIPTS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(SIDES)}}} {{{','.join(SCRIPTS)}}} [that script's flags]")
    side, script = sys.argv[1:3]
    sys.argv = [script, *sys.argv[3:]]  # the script reads its flags from sys.argv
    with one_side_random(side):
        importlib.import_module(script.removesuffix(".py")).main()


if __name__ == "__main__":
    main()
