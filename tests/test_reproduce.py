"""README's Results tables and frontier figure are built from the metric JSONs of
`sample.py --metrics --json` alone (tests/reproduce_results.py): here from hand-made ones, with
numbers whose means, spreads and crossings are known, and no training."""
import math
import re

from PIL import Image

from reproduce_results import (
    MODES,
    differences_table,
    frontier_table,
    measurements,
    on_curve,
    plot_frontier,
    seed_table,
)

NAMES = {"iw_nll": "IW NLL -log p(top | bottom), S=100 (nats)", "diversity": "diversity: mean distance",
         "distinct_digits": "distinct digits among the K", "confidence": "classifier confidence"}
OFFSET = {"mix-and-match": 3.0, "fixed": 0.0, "curriculum": 3.5}  # per mode, added to every seed's value


def hand_made(name, flags):
    """The JSON sample.py --metrics --json would write: at T = 1 a mode's seed s gives
    OFFSET + s (mean OFFSET + 1, sd 1); along the temperatures, distinct digits grow with T at a
    confidence of 0.9 - 0.1 T, fixed one digit short of mix-and-match."""
    mode = next(m for m in MODES if name.startswith(m))
    seed = int(re.search(r"seed(\d)", name).group(1)) if "seed" in name else 0
    temperature = float(flags[flags.index("--temperature") + 1]) if "--temperature" in flags else 1.0
    distinct = temperature + (0.0 if mode == "fixed" else 1.0)
    values = {"iw_nll": 70 + OFFSET[mode] + seed, "diversity": 4 + OFFSET[mode] / 10 + seed / 10,
              "distinct_digits": distinct + seed / 100, "confidence": 0.9 - 0.1 * temperature}
    return {"temperature": temperature, "metrics": {
        key: {"name": NAMES[key], "model": value, "real_top": 0.985 if key == "confidence" else None}
        for key, value in values.items()}}


def metrics():
    return {name: hand_made(name, flags) for name, (_, flags) in measurements("results").items()}


def test_seed_table_is_mean_and_sd_over_the_seeds_with_the_real_tops():
    table = seed_table(metrics())
    # iw_nll: 70 + offset + seed for seeds 0, 1, 2: mean 71 + offset, sample sd 1
    # the last column: the shipped model, mix-and-match seed 0, as sample.py --metrics prints it
    lines = table.splitlines()
    assert "| IW NLL -log p(top \\| bottom), S=100 (nats) | 74.000 ± 1.000 | 71.000 ± 1.000 | 74.500 ± 1.000 |  " \
           "| 73.000 |" in lines
    assert lines[-1].endswith("| 0.800 ± 0.000 | 0.800 ± 0.000 | 0.800 ± 0.000 | 0.985 | 0.800 |")


def test_differences_are_findings_only_beyond_twice_the_seed_spread():
    rows = {line.split(" | ")[0]: line for line in differences_table(metrics()).splitlines()}
    # mix-and-match - fixed = 3 > 2 x 1: a finding; curriculum - mix-and-match = 0.5 < 2: not one
    iw_nll = rows["| IW NLL -log p(top \\| bottom), S=100 (nats)"]
    assert iw_nll.endswith("| +3.000 | 2.000 | yes | +0.500 | 2.000 | no |")
    assert rows["| diversity: mean distance"].endswith("| +0.300 | 0.200 | yes | +0.050 | 0.200 | no |")


def test_frontier_compares_confidence_at_the_same_diversity():
    assert math.isclose(on_curve([(1.0, 0.9), (2.0, 0.8), (4.0, 0.6)], 3.0), 0.7)
    assert on_curve([(1.0, 0.9), (2.0, 0.8)], 2.5) is None  # outside what the curve spans
    table = frontier_table(metrics())
    # mix-and-match at T = 2: 3 digits at 0.7; fixed has 3 digits at T = 3, confidence 0.6
    assert "| mix-and-match | 2 | 3.000 | 4.300 | 0.700 | 0.600 | 0.700 |" in table.splitlines()
    assert "| mix-and-match-test-time alpha 96 | 1.5 |" in table


def test_frontier_figure_is_drawn_from_the_jsons(tmp_path):
    plot_frontier(metrics(), str(tmp_path / "frontier.png"))
    assert Image.open(tmp_path / "frontier.png").size == (1300, 520)  # 13 x 5.2 inches at 100 dpi
