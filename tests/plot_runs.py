"""
Draw the training curves of several runs on one figure, from the history.json each train.py run
writes (not a test; README, Results):

    python3 tests/plot_runs.py --out samples/kl_curves.png mix-and-match=results/history.json \
        fixed=results/fixed/history.json curriculum=results/curriculum/history.json
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import plot_history


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="NAME=HISTORY", help="a label and its run's history.json")
    parser.add_argument("--out", default="samples/kl_curves.png", help="(default: samples/kl_curves.png)")
    args = parser.parse_args()
    histories = {}
    for run in args.runs:
        name, sep, path = run.partition("=")
        if not sep or not os.path.isfile(path):
            parser.error(f"expected NAME=PATH to an existing history.json, got {run!r}")
        with open(path) as f:
            histories[name] = json.load(f)
    plot_history(histories, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
