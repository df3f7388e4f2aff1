"""The report's tables and frontier figure (samples/README.md) are built from the metric JSONs of
`sample.py --metrics --json` alone (tests/reproduce_results.py): here from hand-made ones, with
numbers whose means, spreads and crossings are known, and no training."""
import argparse
import ast
import graphlib
import json
import math
import pathlib
import re
import sys

import pytest
import torch
from PIL import Image

import reproduce_documents
import reproduce_plan
import reproduce_results
import reproduce_runs
from conftest import read_only, refused, write_records
from model import Config, MixAndMatchCVAE
from one_side_random import one_side_random
from reproduce_documents import (
    FIXES_KEYS,
    LATENT_KEYS,
    MECHANISM_KEYS,
    differences_table,
    fidelity_key,
    fixes_tables,
    found_table,
    frontier_table,
    latent_columns,
    latent_differences_table,
    latent_pairs,
    latent_table,
    long_table,
    mechanism_tables,
    on_curve,
    plot_frontier,
    recurrent_columns,
    recurrent_pairs,
    seed_table,
)
from reproduce_plan import MODES, better_fixes, measurements, picked_values
from reproduce_runs import through

NAMES = {"iw_nll": "IW NLL -log p(top | bottom), S=100 (nats)", "diversity": "diversity: mean distance",
         "distinct_digits": "distinct digits among the K", "confidence": "classifier confidence",
         "precision": "precision", "density": "density", "coverage": "coverage"}
OFFSET = {"mix-and-match": 3.0, "fixed": 0.0, "curriculum": 3.5}  # per mode, added to every seed's value


def hand_made(name, flags):
    """The JSON sample.py --metrics --json would write: at T = 1 a mode's seed s gives
    OFFSET + s (mean OFFSET + 1, sd 1); along the temperatures, distinct digits grow with T at a
    confidence of 0.9 - 0.1 T, fixed one digit short of mix-and-match. Precision varies between the
    seeds (0.5 + 0.1 s), density hardly (0.6 + 0.001 s), both falling by 0.05 per unit of T."""
    mode = next((m for m in MODES if name.startswith(m)), "mix-and-match")  # "shipped": a mix-and-match model
    seed = int(re.search(r"seed(\d)", name).group(1)) if "seed" in name else 0
    temperature = float(flags[flags.index("--temperature") + 1]) if "--temperature" in flags else 1.0
    distinct = temperature + (0.0 if mode == "fixed" else 1.0)
    values = {"iw_nll": 70 + OFFSET[mode] + seed, "diversity": 4 + OFFSET[mode] / 10 + seed / 10,
              "distinct_digits": distinct + seed / 100, "confidence": 0.9 - 0.1 * temperature,
              "precision": 0.5 + 0.1 * seed - 0.05 * temperature, "density": 0.6 + 0.001 * seed - 0.05 * temperature,
              "coverage": 0.3}
    return {"temperature": temperature, "metrics": {
        key: {"name": NAMES[key], "model": value, "real_top": 0.985 if key == "confidence" else 0.9}
        for key, value in values.items()}}


def metrics():
    return {name: hand_made(name, flags) for name, (_, flags) in measurements("results").items()}


def test_seed_table_is_mean_and_sd_over_the_seeds_with_the_real_tops():
    table = seed_table(metrics())
    # iw_nll: 70 + offset + seed for seeds 0, 1, 2: mean 71 + offset, sample sd 1
    # the last column: the shipped model, mix-and-match seed 0, as sample.py --metrics prints it
    lines = table.splitlines()
    assert "| IW NLL -log p(top \\| bottom), S=100 (nats) | 74.000 ± 1.000 | 71.000 ± 1.000 | 74.500 ± 1.000 | 0.900 " \
           "| 73.000 |" in lines
    assert "| classifier confidence | 0.800 ± 0.000 | 0.800 ± 0.000 | 0.800 ± 0.000 | 0.985 | 0.800 |" in lines


def test_differences_are_findings_only_beyond_twice_the_seed_spread():
    rows = {line.split(" | ")[0]: line for line in differences_table(metrics()).splitlines()}
    # mix-and-match - fixed = 3 > 2 x 1: a finding; curriculum - mix-and-match = 0.5 < 2: not one
    iw_nll = rows["| IW NLL -log p(top \\| bottom), S=100 (nats)"]
    assert iw_nll.endswith("| +3.000 | 2.000 | yes | +0.500 | 2.000 | no |")
    assert rows["| diversity: mean distance"].endswith("| +0.300 | 0.200 | yes | +0.050 | 0.200 | no |")


def test_frontier_compares_confidence_at_the_same_diversity():
    assert math.isclose(on_curve([(1.0, 0.9), (2.0, 0.8), (4.0, 0.6)], 3.0), 0.7)
    assert on_curve([(1.0, 0.9), (2.0, 0.8)], 2.5) is None  # outside what the curve spans
    table = frontier_table(metrics(), full=True)
    # mix-and-match at T = 2: 3 digits at density 0.5 and confidence 0.7; fixed has 3 digits at T = 3,
    # density 0.45 and confidence 0.6
    assert table.splitlines()[0].startswith("| model (seed 0) | T | distinct digits | mean distance | density |")
    assert ("| mix-and-match | 2 | 3.000 | 4.300 | 0.500 | 0.700 | 0.300 | 0.450 | 0.500 | 0.600 | 0.700 |"
            in table.splitlines())
    assert "| mix-and-match-test-time alpha 96 | 1.5 |" in table
    # the report's: the fidelity curves only, at fewer temperatures (samples/tables/frontier.md has the rest)
    report = frontier_table(metrics()).splitlines()
    assert "| mix-and-match | 2 | 3.000 | 4.300 | 0.500 | 0.700 | 0.300 | 0.450 | 0.500 |" in report
    assert len(report[0].split(" | ")) == 9 and not any(line.startswith("| fixed | 1.25 |") for line in report)


def test_the_fidelity_axis_is_the_measure_that_varies_less_between_seeds():
    assert fidelity_key(metrics()) == "density"  # precision moves by 0.1 per seed, density by 0.001
    swapped = metrics()
    for m in swapped.values():
        m["metrics"]["precision"], m["metrics"]["density"] = m["metrics"]["density"], m["metrics"]["precision"]
    assert fidelity_key(swapped) == "precision"


def test_frontier_figure_is_drawn_from_the_jsons(tmp_path):
    plot_frontier(metrics(), str(tmp_path / "frontier.png"))
    assert Image.open(tmp_path / "frontier.png").size == (1600, 520)  # 16 x 5.2 inches at 100 dpi


def latent_metrics():
    """Hand-made JSONs of the latent-use runs: a run's seed s has KL = base + s (sd 1), with base 10 for
    the MLP and 1 for the autoregressive decoder, plus 2 for fixed and concat; no diversity from the
    Sampling alone where there is no random Sampling; the long runs' KL is half their base."""
    made = {}
    for name in [*measurements("latent-use"), *measurements("recurrent")]:
        seed = int(re.search(r"seed(\d)", name).group(1))
        mode = next(m for m in ("mix-and-match", "fixed", "concat") if m in name)
        kl = float((1 if name.startswith(("ar-", "rnn-")) else 10) + (0 if mode == "mix-and-match" else 2) + seed)
        kl += 0.5 if name.startswith("rnn-tf-") else 0
        kl = kl / 2 if "-long" in name else kl
        values = {key: 1.0 for key in LATENT_KEYS}
        values.update(kl=kl, active_units=3, diversity_sampling=None if mode != "mix-and-match" else 0.5)
        made[name] = {"metrics": {key: {"name": key.replace("_", " "), "model": value, "real_top": None}
                                  for key, value in values.items()}}
    return made


def test_latent_use_tables_from_hand_made_runs():
    lines = latent_table(latent_metrics(), latent_columns()).splitlines()
    assert lines[0] == ("| metric (per test image), mean ± sd over seeds 0, 1, 2 | MLP, mix-and-match | "
                        "MLP, fixed | MLP, concat | autoregressive, mix-and-match | autoregressive, fixed | "
                        "autoregressive, concat |")
    assert "| kl | 11.000 ± 1.000 | 13.000 ± 1.000 | 13.000 ± 1.000 | 2.000 ± 1.000 | 4.000 ± 1.000 | 4.000 ± 1.000 |" \
        in lines
    assert "| diversity sampling | 0.500 ± 0.000 | n/a | n/a | 0.500 ± 0.000 | n/a | n/a |" in lines
    lines = latent_differences_table(latent_metrics(), latent_pairs()).splitlines()
    columns = lines[0].split(" | ")
    rows = {line.split(" | ")[0]: line.split(" | ") for line in lines}
    # autoregressive mix-and-match - fixed: KL 2 - 4 = -2, beyond twice the sd of 1? no (2 is not > 2)
    assert rows["| kl"][columns.index("autoregressive mix-and-match − autoregressive fixed")] == "-2.000 (2.000)"
    # each decoder against the other: -9, a finding
    assert rows["| kl"][columns.index("autoregressive mix-and-match − MLP mix-and-match")] == "-9.000 (2.000, yes)"
    assert rows["| diversity sampling"][columns.index("MLP mix-and-match − MLP fixed")] == "n/a"
    long = {line.split(" | ")[0]: line for line in long_table(latent_metrics(), "ar-").splitlines()}
    assert long["| kl"] == "| kl | 1.000 | 0.500 | 3.000 | 1.500 | 3.000 | 1.500 |"


def test_recurrent_tables_from_hand_made_runs():
    lines = latent_table(latent_metrics(), recurrent_columns()).splitlines()
    assert lines[0].endswith("| recurrent, mix-and-match | recurrent, fixed | recurrent, concat | recurrent always "
                             "teacher-forced, mix-and-match | recurrent always teacher-forced, fixed |")
    assert "| kl | 2.000 ± 1.000 | 4.000 ± 1.000 | 4.000 ± 1.000 | 2.500 ± 1.000 | 4.500 ± 1.000 |" in lines
    lines = latent_differences_table(latent_metrics(), recurrent_pairs()).splitlines()
    columns, rows = lines[0].split(" | "), {line.split(" | ")[0]: line.split(" | ") for line in lines}
    assert rows["| kl"][columns.index("recurrent mix-and-match − recurrent always teacher-forced mix-and-match")] \
        == "-0.500 (2.000)"
    assert rows["| kl"][columns.index("recurrent mix-and-match − recurrent concat")] == "-2.000 (2.000)"
    long = {line.split(" | ")[0]: line for line in long_table(latent_metrics(), "rnn-").splitlines()}
    assert long["| kl"] == "| kl | 1.000 | 0.500 | 3.000 | 1.500 | 3.000 | 1.500 |"
    assert long_table(latent_metrics(), "rnn-").startswith("| recurrent decoder, seed 0 | mix-and-match, epoch 50 |")


def fix_measurement(name):
    """A hand-made JSON of a run of section "fixes": diversity from z alone is 1 + the fix's value
    for free bits, 2 - the value for history dropout (the sweeps pick 0.5 and 0.25: 1.5 against
    1.75, so history dropout is the better fix), plus the seed; KL is 5 + seed for the
    autoregressive decoder's concat with history dropout, else 1 + seed."""
    seed = int(re.search(r"seed(\d)", name).group(1))
    fix = re.search(r"-(fb|hd)([\d.]+)-seed", name)
    diversity_z = 1.0 if not fix else 1 + float(fix[2]) if fix[1] == "fb" else 2 - float(fix[2])
    kl = 5.0 if name.startswith("ar-concat-hd") else 1.0
    values = {key: 1.0 for key in LATENT_KEYS}
    values.update(kl=kl + seed, diversity_z=diversity_z + seed, active_units=3)
    return {"metrics": {key: {"name": key.replace("_", " "), "model": value, "real_top": None}
                        for key, value in values.items()}}


def measure_all(tmp_path, names):
    write_records(tmp_path / "records", {name: fix_measurement(name) for name in names})


def test_fixes_runs_follow_the_sweep_then_the_seeds_of_the_fixes(tmp_path):
    args = argparse.Namespace(runs_dir=str(tmp_path), records_dir=str(tmp_path / "records"))
    todo = measurements("fixes", args)
    sweep = [name for name in todo if re.search("-(fb|hd)", name)]
    assert len(sweep) == 12 and all(name.endswith("-seed0-T1") for name in sweep)  # 2 decoders x 2 fixes x 3
    assert "rnn-concat-seed1-T1" in todo and "ar-fixed-seed2-T1" in todo and "rnn-tf-fixed-seed1-T1" not in todo
    measure_all(tmp_path, [name for name in todo if name != "rnn-concat-hd0.75-seed0-T1"])
    todo = measurements("fixes", args)  # one sweep not measured yet: its seeds wait
    assert {"ar-concat-fb0.5-seed1-T1", "ar-concat-hd0.25-seed2-T1", "rnn-concat-fb0.5-seed2-T1"} <= set(todo)
    assert not any(name.startswith("rnn-concat-hd") and "seed1" in name for name in todo)
    assert todo["ar-concat-fb0.5-seed2-T1"] == ("ar-concat-fb0.5-seed2", [])
    assert not any("mix-and-match-" in name and re.search("-(fb|hd)", name) for name in todo)
    measure_all(tmp_path, ["rnn-concat-hd0.75-seed0-T1", *todo])
    todo = measurements("fixes", args)  # the autoregressive fixes' seeds measured: mix-and-match with the better
    both = [name for name in todo if "mix-and-match-" in name and re.search("-(fb|hd)", name)]
    assert sorted(both) == [f"ar-mix-and-match-hd0.25-seed{s}-T1" for s in (0, 1, 2)]
    assert "rnn-concat-hd0.25-seed1-T1" in todo  # the recurrent sweep's last value was measured just now
    measure_all(tmp_path, todo)
    both = [name for name in measurements("fixes", args) if "mix-and-match-" in name and re.search("-(fb|hd)", name)]
    assert sorted(both) == sorted(f"{d}-mix-and-match-hd0.25-seed{s}-T1" for d in ("ar", "rnn") for s in (0, 1, 2))
    made = {name: fix_measurement(name) for name in measurements("fixes", args)}
    assert len(made) == 12 + 18 + 8 + 6


def test_fixes_tables_from_hand_made_runs(tmp_path):
    args = argparse.Namespace(runs_dir=str(tmp_path), records_dir=str(tmp_path / "records"))
    for _ in range(3):  # the sweep, then the seeds, then mix-and-match with the better fix
        measure_all(tmp_path, measurements("fixes", args))
    made = {name: fix_measurement(name) for name in measurements("fixes", args)}
    picks = picked_values(made)
    assert picks == {("ar-", "free bits"): 0.5, ("ar-", "history dropout"): 0.25,
                     ("rnn-", "free bits"): 0.5, ("rnn-", "history dropout"): 0.25}
    better = better_fixes(made, picks)
    assert better == {"ar-": "history dropout", "rnn-": "history dropout"}
    methods, sweep, differences = fixes_tables(made)
    lines = methods.splitlines()
    assert lines[0] == ("| method, mean ± sd over seeds 0, 1, 2 | KL (nats) | active units | z alone | diversity | "
                        "IW NLL (nats) | precision | coverage | Fréchet |")
    # KL 5 + seed: mean 6, sd 1; diversity from z 2 - 0.25 + seed: mean 2.75
    assert lines[2 + 4].startswith("| autoregressive, concat + history dropout 0.25 | 6.000 ± 1.000 | 3.000 ± 0.000 "
                                   "| 2.750 ± 1.000 |")
    assert lines[2 + 5].startswith("| autoregressive, mix-and-match + history dropout 0.25 | 2.000 ± 1.000 |")
    assert len(lines) == 2 + 2 * 6
    sweep_lines = sweep.splitlines()
    assert "| recurrent, free bits 0.1 | 1.000 | 3 | 1.100 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in sweep_lines
    assert len(sweep_lines) == 2 + 2 * 7
    lines = differences.splitlines()
    columns, rows = lines[0].split(" | "), {line.split(" | ")[0]: line.split(" | ") for line in lines}
    # history dropout's KL 6 against concat's 2: +4, beyond twice the sd of 1
    assert rows["| kl"][columns.index("autoregressive concat --history-dropout 0.25 − autoregressive concat")] \
        == "+4.000 (2.000, yes)"
    assert [line.split(" | ")[0] for line in lines[2:]] == [f"| {key.replace('_', ' ')}" for key in FIXES_KEYS]
    assert rows["| kl"][columns.index("autoregressive mix-and-match --history-dropout 0.25 − autoregressive "
                                      "concat --history-dropout 0.25")] == "-4.000 (2.000, yes)"


def test_one_side_random_gives_the_other_side_the_fixed_split():
    torch.manual_seed(0)
    model = MixAndMatchCVAE(Config(hidden_dim=32, latent_dim=8)).eval()
    data, condition, z = torch.rand(4, 500), torch.rand(4, 284), torch.randn(4, 8)
    condition_h = model.condition_encoder(condition)
    drawn, fixed = torch.arange(16, 32), torch.arange(16)  # a drawn I, and the fixed split's

    def sides(sampled):
        return model.encode(data, condition_h, sampled)[0], model.decode(z, condition_h, sampled)

    with torch.no_grad():
        with one_side_random("decoder"):  # the decoder follows the drawn I, the encoder keeps the fixed one
            (encoded, decoded), (encoded_fixed, decoded_fixed) = sides(drawn), sides(fixed)
        assert torch.equal(encoded, encoded_fixed) and not torch.equal(decoded, decoded_fixed)
        with one_side_random("encoder"):
            (encoded, decoded), (encoded_fixed, decoded_fixed) = sides(drawn), sides(fixed)
        assert not torch.equal(encoded, encoded_fixed) and torch.equal(decoded, decoded_fixed)
        (encoded, decoded), (encoded_fixed, decoded_fixed) = sides(drawn), sides(fixed)  # and afterwards, both
    assert not torch.equal(encoded, encoded_fixed) and not torch.equal(decoded, decoded_fixed)


def test_one_side_random_trains_and_measures_through_train_and_sample(tmp_path, in_process, mnist_root):
    common = ["--data-root", mnist_root, "--device", "cpu"]
    for script, folder in [("tests/one_side_random.py", "encoder"), ("train.py", "plain")]:
        side = ["encoder", "train.py"] if folder == "encoder" else []
        in_process(script, *side, *common, "--epochs", 1, "--checkpoint-dir", folder, "--results-dir", "res",
                   cwd=tmp_path, check=True)
    variant, plain = (torch.load(tmp_path / folder / "mix_match_01.pth", weights_only=True)["model"]
                      for folder in ("encoder", "plain"))
    assert any(not torch.equal(variant[name], plain[name]) for name in plain)  # the same draws, trained otherwise
    in_process("tests/one_side_random.py", "encoder", "sample.py", *common, "--checkpoint", "encoder/mix_match_01.pth",
               "--metrics", "--n-eval", 20, "--n-samples", 4, "--n-importance", 4, "--json", "m.json", "--out", "g.png",
               cwd=tmp_path, check=True)
    measured = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["metrics"]
    assert measured["diversity_sampling"]["model"] == 0  # its decoder always has the fixed split
    assert measured["diversity_z"]["model"] > 0
    refused = in_process("tests/one_side_random.py", "both", "train.py", cwd=tmp_path)
    assert refused.returncode != 0 and "usage:" in refused.stderr
    refused = in_process("tests/one_side_random.py", "decoder", "train.py", *common, "--conditioning", "concat",
                         "--epochs", 1, "--checkpoint-dir", "concat", "--results-dir", "res", cwd=tmp_path)
    assert refused.returncode == 1 and "needs --conditioning mix-and-match" in refused.stderr
    assert not (tmp_path / "concat" / "mix_match_01.pth").exists()


def test_mechanism_runs_go_through_one_side_random_into_their_tables():
    todo = measurements("mechanism")
    assert len(todo) == 2 * 4 * 3  # 2 decoders x (2 one-side variants, mix-and-match, fixed) x 3 seeds
    assert {"ar-random-decoder-seed2-T1", "rnn-random-encoder-seed0-T1", "rnn-fixed-seed1-T1"} <= set(todo)
    assert through("rnn-random-encoder-seed0", "sample.py") == ["tests/one_side_random.py", "encoder", "sample.py"]
    assert through("rnn-mix-and-match-seed0", "train.py") == ["train.py"]
    kl = {"mix-and-match": 1.0, "random-decoder": 2.0, "random-encoder": 5.0, "fixed": 6.0}
    made = {}
    for name in todo:
        values = {key: 1.0 for key in MECHANISM_KEYS}
        values["kl"] = kl[next(k for k in kl if f"-{k}-" in name)] + int(name[name.index("seed") + 4])
        made[name] = {"metrics": {key: {"name": key.replace("_", " "), "model": value, "real_top": None}
                                  for key, value in values.items()}}
    methods, differences = mechanism_tables(made)
    lines = methods.splitlines()
    assert [line.split(" | ")[0] for line in lines[2:6]] == [
        "| autoregressive, redrawn on both sides (mix-and-match)", "| autoregressive, redrawn on the decoder side only",
        "| autoregressive, redrawn on the encoder side only", "| autoregressive, redrawn on neither (fixed)"]
    assert lines[3].split(" | ")[1] == "3.000 ± 1.000" and len(lines) == 2 + 8
    lines = differences.splitlines()
    columns, rows = lines[0].split(" | "), {line.split(" | ")[0]: line.split(" | ") for line in lines}
    assert rows["| kl"][columns.index("recurrent random-decoder − recurrent mix-and-match")] == "+1.000 (2.000)"
    assert rows["| kl"][columns.index("recurrent random-encoder − recurrent mix-and-match")] == "+4.000 (2.000, yes)"


def test_readmes_table_has_each_decoders_conditionings_and_the_fix_that_won(tmp_path):
    args = argparse.Namespace(runs_dir=str(tmp_path), records_dir=str(tmp_path / "records"))
    for _ in range(3):
        measure_all(tmp_path, measurements("fixes", args))
    made = {name: fix_measurement(name) for name in [*measurements("fixes", args), *measurements("latent-use")]}
    lines = found_table(made).splitlines()
    assert lines[0] == ("| decoder, conditioning, mean ± sd over seeds 0, 1, 2 | KL (nats) | z alone | "
                        "Sampling alone | diversity | IW NLL (nats) | coverage | Fréchet |")  # 8 columns
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| MLP, mix-and-match", "| MLP, fixed", "| MLP, concat",
        "| autoregressive, mix-and-match", "| autoregressive, fixed", "| autoregressive, concat",
        "| autoregressive, concat + history dropout 0.25",
        "| recurrent, mix-and-match", "| recurrent, fixed", "| recurrent, concat",
        "| recurrent, concat + history dropout 0.25"]
    # autoregressive concat with history dropout 0.25: KL 5 + seed, diversity from z 2 - 0.25 + seed
    assert lines[2 + 6].startswith("| autoregressive, concat + history dropout 0.25 | 6.00 ± 1.00 | 2.75 ± 1.00 |")


def test_the_reproduction_refuses_a_wrong_data_root_before_any_training(tmp_path, in_process):
    result = in_process("tests/reproduce_results.py", "--data-root", tmp_path / "nowhere", "--runs-dir",
                        tmp_path / "runs", cwd=tmp_path)
    assert result.returncode == 1 and "MNIST is not under" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()

@pytest.mark.parametrize("fault, message", [
    (KeyboardInterrupt, "interrupted: the runs and measurements finished so far are kept; run the same command"),
    (OSError(28, "No space left on device", "runs/metrics/x.log"),
     "error: runs/metrics/x.log: the disk is full (No space left on device): free space, then run the same"),
])
def test_the_reproduction_stops_on_ctrl_c_or_a_full_disk_with_one_line(mnist_root, monkeypatch, fault, message):
    def faulty(args):
        raise fault
    monkeypatch.setattr(reproduce_results, "reproduce", faulty)
    monkeypatch.setattr(sys, "argv", ["reproduce_results.py", "--data-root", mnist_root])
    with pytest.raises(SystemExit, match=re.escape(message)):
        reproduce_results.main()

@pytest.mark.parametrize("content", ["{\"metrics\": {\"kl\": ", "null", "{\"checkpoint\": \"x\"}"])
def test_a_measurement_json_left_broken_is_measured_again(tmp_path, monkeypatch, capsys, content):
    args = argparse.Namespace(runs_dir=str(tmp_path), records_dir=str(tmp_path / "records"), data_root="data",
                              threads=1)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "m-T1.json").write_text(content, encoding="utf-8")  # cut short, or edited by another tool
    calls = []
    monkeypatch.setattr(reproduce_runs, "run", lambda args, what, log, script, *rest: calls.append(script) or 1.0)
    assert reproduce_runs.read_json(str(tmp_path / "metrics" / "m-T1.json")) is None
    reproduce_runs.measure(args, "m-T1", "run", [], 50)
    assert calls == ["sample.py"] and "its JSON is broken" in capsys.readouterr().out

def test_a_runs_folder_that_is_a_file_is_named_before_any_work(command, tmp_path):
    (tmp_path / "runs").write_text("", encoding="utf-8")
    refused(command("--runs-dir", tmp_path / "runs", "--section", "results"), f"--runs-dir {tmp_path / 'runs'} is a "
            "file, not a folder")

def test_a_runs_folder_that_cannot_be_written_is_named_before_any_work(command, tmp_path):
    (tmp_path / "runs").mkdir()
    with read_only(tmp_path / "runs"):
        refused(command("--runs-dir", tmp_path / "runs", "--section", "results"),
                f"cannot write in the folder '{tmp_path / 'runs'}'", "pass another --runs-dir")

@pytest.mark.parametrize("flags, message", [
    (["--verify", "fixed-seed1", "--tables"], "--tables and --verify: give one of them"),
    (["--verify", "fixed-seed1", "--section", "results"], "--verify and --section: give one of them"),
    (["--tables", "--section", "fixes"], "--tables and --section: give one of them"),
    (["--verify", "fixed-seed1", "--threads", "2"], "--verify trains with its record's thread count"),
    (["--verify", "fixed-seed1", "--jobs", "2"], "leave out --threads and --jobs"),
    (["--jobs", "0"], "argument --jobs: "),
    (["--verify", ""], "argument --verify: expected a name or a path, got an empty string"),  # an unset variable
    (["--records-dir", ""], "argument --records-dir: expected a name or a path, got an empty string"),
    (["--runs-dir", "", "--tables"], "argument --runs-dir: expected a name or a path, got an empty string"),
    (["--section", "everything"], "argument --section: invalid choice: 'everything'"),
])
def test_flags_that_contradict_each_other_or_are_out_of_range_are_refused(command, flags, message):
    refused(command(*flags), message, code=2)



DOCUMENT = """# Results
<!-- table seeds -->
stale
<!-- /table -->
Text that stays.
<!-- table mechanism -->
stale
<!-- /table -->
"""


def test_tables_are_written_from_the_records_pending_where_a_section_is_not_recorded(tmp_path, monkeypatch, capsys):
    (tmp_path / "samples").mkdir()
    for document in ("README.md", "samples/README.md"):
        (tmp_path / document).write_text(DOCUMENT, encoding="utf-8")
    monkeypatch.setattr(reproduce_documents, "DOCUMENT_ROOT", str(tmp_path))
    monkeypatch.setattr(reproduce_documents, "figures", dict)
    write_records(tmp_path / "records", metrics())
    records = str(tmp_path / "records")
    assert reproduce_documents.write_documents(records, check=True) == 1  # stale tables
    assert "README.md: its tables differ from what the records give" in capsys.readouterr().out
    assert reproduce_documents.write_documents(records) == 0
    out = capsys.readouterr().out
    assert "section mechanism: 24 measurements not recorded yet (ar-random-decoder-seed0-T1" in out
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert text.startswith("# Results\n<!-- table seeds -->\n| metric (per test image), mean ± sd over seeds 0, 1, 2 |")
    assert "<!-- /table -->\nText that stays.\n<!-- table mechanism -->\n*Pending: measurements not recorded yet " \
           "(24 of section mechanism);" in text
    tables = tmp_path / "samples" / "tables"
    assert (tables / "seed_differences.md").read_text(encoding="utf-8").startswith("| metric | mix-and-match")
    assert (tables / "mechanism_differences.md").read_text(encoding="utf-8").startswith("*Pending: ")
    assert reproduce_documents.write_documents(records, check=True) == 0  # as the records give
    edited_by_hand = text.replace("| 74.000 ± 1.000 |", "| 74.001 ± 1.000 |")
    (tmp_path / "README.md").write_text(edited_by_hand, encoding="utf-8")
    assert reproduce_documents.write_documents(records, check=True) == 1
    (tmp_path / "README.md").write_text(text + "<!-- table nonsense -->\n<!-- /table -->\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="a table marker of no table of this reproduction: nonsense"):
        reproduce_documents.write_documents(records)


def test_the_provenance_counts_the_classifier_that_judged_each_measurement(tmp_path):
    write_records(tmp_path, {"a-seed0-T1": {"metrics": {}}, "a-seed0-T2": {"metrics": {}},
                             "b-seed0-T1": {"classifier_accuracy": 0.98, "metrics": {}}})
    text = reproduce_documents.provenance(reproduce_plan.read_records(str(tmp_path)), str(tmp_path))
    assert "2 runs recorded. " in text and "The digit classifier's test accuracy (measurements): 98.00% (1), " \
                                           "99.13% (2). " in text


def test_the_reproductions_parts_import_downwards_only_and_no_test_file_imports_another():
    """The scripts under tests/ import each other in one order, none back up it (a cycle would make
    each part of the reproduction need all the others to be read, fixed or tested); a test file
    imports the scripts it tests and conftest, never another test file."""
    folder = pathlib.Path(__file__).parent
    ours = {path.stem for path in folder.glob("*.py")}
    imports = {}
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # those inside functions too
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        imports[path.stem] = names & ours - {path.stem}
    assert {name: sorted(imported) for name, imported in imports.items() if name.startswith("test_")
            and any(other.startswith("test_") for other in imported)} == {}
    assert imports["reproduce_plan"] <= {"one_side_random"}  # what the others stand on imports none of them
    list(graphlib.TopologicalSorter(imports).static_order())  # CycleError names a cycle
