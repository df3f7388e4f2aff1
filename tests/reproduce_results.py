"""
Reproduce README's Results (not a test): train every run, measure each with
`sample.py --metrics --json`, then write the tables and the figures from those JSONs alone.

    python3 tests/reproduce_results.py --data-root ../shared/data [--section SECTION]

Section "results" (README, Results):
- Seeds: mix-and-match, fixed and mix-and-match --curriculum-step 1, seeds 0, 1 and 2, with the
  tutorial's recipe; each measured at T = 1.
- The frontier: each mode's seed-0 model at the temperatures TEMPERATURES; the default model at
  test-time alphas TEST_ALPHAS; mix-and-match and fixed trained at TRAIN_ALPHAS (seed 0), at T = 1.
Section "latent-use" (README, "Does Mix-and-Match keep the latent in use?"):
- mix-and-match, fixed and concat, each with the MLP and the autoregressive decoder, seeds 0, 1
  and 2 (the MLP's mix-and-match and fixed are the runs of "results"); the autoregressive seed-0
  runs continued to LONG_EPOCHS; each measured at T = 1.
Section "recurrent" (the same README section, the paper's own regime):
- mix-and-match, fixed and concat with the recurrent decoder and train.py's schedule of teacher
  forcing, seeds 0, 1 and 2, the seed-0 runs continued to LONG_EPOCHS; mix-and-match and fixed
  also always teacher-forced, to tell what feeding back its own rows changes; each at T = 1.
Section "fixes" (README, "Mix-and-Match or the usual fix?"):
- the ordinary CVAE (concat) with each fix of FIXES, with each expressive decoder: a seed-0 sweep
  of the fix's values, then seeds 1 and 2 at the value the sweep picks (the most diversity from z
  alone, what the fix is for), then mix-and-match with the better of the two fixes, seeds 0, 1
  and 2; beside mix-and-match, fixed and concat with the same decoder (the runs of "latent-use"
  and "recurrent", named alike so that they are trained once); each at T = 1.
Section "mechanism" (README, "Does Mix-and-Match keep the latent in use?"):
- with each expressive decoder, the Sampling redrawn on one side only (tests/one_side_random.py:
  the decoder's, then the encoder's), seeds 0, 1 and 2, beside mix-and-match (both sides) and fixed
  (neither), the runs of "latent-use" and "recurrent"; each at T = 1.

The runs live under results/reproduce/ (ignored by git). A run whose output is there is skipped
and a training that was interrupted resumes from its newest checkpoint, so the same command
continues an interrupted reproduction. Two of them may run at once (one per core, each with
OMP_NUM_THREADS=1): a run one is training (its train.lock) is left to it, and the tables are
written by the one that finds every run done. Writes results/reproduce/results.md, latent_use.md,
recurrent.md, fixes.md and mechanism.md (README's tables), samples/frontier.png,
samples/kl_curves.png, samples/kl_autoregressive.png, samples/kl_recurrent.png and the seed-0
completion grids samples/sampled*.png.
"""
import argparse
import contextlib
import glob
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch

from one_side_random import SIDES
from utils import mnist_dataset, plot_history, process_lock, save_figure

MODES = {"mix-and-match": [], "fixed": ["--conditioning", "fixed"], "curriculum": ["--curriculum-step", "1"]}
SEEDS = (0, 1, 2)
TEMPERATURES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)  # until diversity stops growing
TEST_ALPHAS, TEST_ALPHA_TEMPERATURES = (32, 96), (1.0, 1.5)  # the default model, sampled with another alpha
TRAIN_ALPHAS = (16, 32, 96, 112)  # 64, the default, is the seed runs
EPOCHS = 50
# latent use: every conditioning with each decoder (run names "concat-seed0", "ar-fixed-seed1", ...)
CONDITIONINGS = {"mix-and-match": [], "fixed": ["--conditioning", "fixed"], "concat": ["--conditioning", "concat"]}
DECODERS = {"mlp": ("", []), "autoregressive": ("ar-", ["--decoder", "autoregressive"])}  # run-name prefix, flags
LONG_EPOCHS = 200  # the autoregressive KLs still fall at epoch 50
SHIPPED = os.path.join(REPO, "checkpoint", "mix_match_50.pth")  # measured as the run "shipped"
# the recurrent decoder: run-name prefix and flags, with train.py's schedule of teacher forcing, and
# always teacher-forced (mix-and-match and fixed only)
RECURRENT = ("rnn-", ["--decoder", "recurrent"])
ALWAYS_FORCED = ("rnn-tf-", ["--decoder", "recurrent", "--teacher-forcing-epochs", "0"], ("mix-and-match", "fixed"))
# the standard fixes for an ignored latent, each on the ordinary CVAE (concat) with each expressive
# decoder: {name: (train.py flag, run-name tag, the seed-0 sweep's values)}. Free bits in nats per
# latent unit (32 units: a floor of 3.2 to 16 nats, from about the autoregressive concat's KL up);
# history dropout as the probability of a zeroed pixel or row, light to heavy
FIXES = {"free bits": ("--free-bits", "fb", (0.1, 0.25, 0.5)),
         "history dropout": ("--history-dropout", "hd", (0.25, 0.5, 0.75))}
EXPRESSIVE = {"autoregressive": DECODERS["autoregressive"], "recurrent": RECURRENT}
SECTIONS = ("recurrent", "fixes", "mechanism", "latent-use", "results")  # the longest chains of runs first


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="./data", help="folder holding MNIST/raw/ (default: ./data)")
    parser.add_argument("--runs-dir", default=os.path.join(REPO, "results", "reproduce"),
                        help="where the runs live (default: results/reproduce)")
    parser.add_argument("--section", choices=SECTIONS,
                        help="reproduce one section of README only (default: all of them)")
    args = parser.parse_args()
    for train in (True, False):  # a wrong --data-root ends here, not in the first of many trainings
        mnist_dataset(args.data_root, train)
    try:
        reproduce(args)
    except KeyboardInterrupt:  # train.py and sample.py got the Ctrl-C too, and left their files whole
        sys.exit("interrupted: the runs and measurements finished so far are kept; run the same command again to "
                 "continue (an interrupted training resumes from its last checkpoint)")
    except OSError as e:  # a full disk while writing a log or a table
        sys.exit(f"error: {e.filename}: {e.strerror}. The finished runs are kept; free space, then run the same "
                 f"command again to continue.")


def reproduce(args):
    sections = [args.section] if args.section else SECTIONS
    t0 = time.time()
    done_with = None
    while True:  # until no run is added: the fixes' later runs follow from the measurements of earlier ones
        trainings, measures = {}, {}
        for section in sections:
            trainings.update(training_runs(section, args))
            measures.update(measurements(section, args))
        if set(measures) == done_with:
            break
        done_with = set(measures)
        pending = [name for i, (name, (flags, epochs, start)) in enumerate(trainings.items(), 1)
                   if not train(args, name, flags, epochs, start, f"[{i}/{len(trainings)}]")]
        pending += [name for i, (name, (run_name, flags)) in enumerate(measures.items(), 1)
                    if not measure(args, name, run_name, flags, f"[{i}/{len(measures)}]")]
    # what the other reproduction was on may have ended meanwhile; then this one writes the tables
    pending = [name for name in pending if not (read_measurement(args, name) is not None if name in measures else
                                                os.path.isfile(final_checkpoint(args, name, trainings[name][1])))]
    if pending:
        sys.exit(f"another reproduction is working on {', '.join(pending)}: run this command again once it "
                 f"has ended, to finish those and write the tables")

    metrics = {name: read_measurement(args, name) for name in measures}
    samples = os.path.join(REPO, "samples")
    if "results" in sections:
        write_tables(os.path.join(args.runs_dir, "results.md"),
                     [seed_table(metrics), differences_table(metrics), frontier_table(metrics)])
        plot_frontier(metrics, os.path.join(samples, "frontier.png"))
        plot_history({mode: checkpoint_history(args, f"{mode}-seed0") for mode in MODES},
                     os.path.join(samples, "kl_curves.png"))
        copy_grids(args, {"mix-and-match": "sampled.png", "fixed": "sampled_fixed.png",
                          "curriculum": "sampled_curriculum.png"})
    if "recurrent" in sections:
        write_latent_section(args, metrics, "recurrent", recurrent_columns(), recurrent_pairs())
    if "latent-use" in sections:
        write_latent_section(args, metrics, "latent-use", latent_columns(), latent_pairs())
    if "fixes" in sections:
        write_tables(os.path.join(args.runs_dir, "fixes.md"), fixes_tables(metrics))
    if "mechanism" in sections:
        write_tables(os.path.join(args.runs_dir, "mechanism.md"), mechanism_tables(metrics))
    print(f"wrote under {args.runs_dir} and samples/ ({', '.join(sections)}); {(time.time() - t0) / 60:.1f} min")


def write_latent_section(args, metrics, section, columns, pairs):
    """A latent-use section's tables in <section>.md (every measure by column, the pairs'
    differences, the long runs' decoder at EPOCHS and LONG_EPOCHS), the curves of those long runs
    (samples/kl_<decoder>.png) and their seed-0 grids (samples/sampled_<prefix>_<mode>.png)."""
    prefix = grid_and_long_prefix(section)[1]
    decoder = run_label(prefix).strip()
    write_tables(os.path.join(args.runs_dir, f"{section.replace('-', '_')}.md"),
                 [latent_table(metrics, columns), latent_differences_table(metrics, pairs),
                  long_table(metrics, prefix)])
    plot_history({f"{decoder}, {mode}": checkpoint_history(args, f"{prefix}{mode}-seed0-long", LONG_EPOCHS)
                  for mode in CONDITIONINGS}, os.path.join(REPO, "samples", f"kl_{decoder}.png"))
    copy_grids(args, {f"{prefix}{mode}": f"sampled_{prefix[:-1]}_{mode}.png" for mode in CONDITIONINGS})


def write_tables(path, tables):
    tables = "\n\n".join(tables)
    with open(path, "w") as f:
        f.write(tables + "\n")
    print(tables)


def copy_grids(args, grids):
    """The T = 1 completion grid of each seed-0 run ({run prefix: file name}) into samples/."""
    for prefix, grid in grids.items():
        shutil.copyfile(os.path.join(args.runs_dir, "metrics", f"{prefix}-seed0-T1.png"),
                        os.path.join(REPO, "samples", grid))


def latent_runs():
    """{run name: train.py flags} of the latent-use grid: conditioning x decoder x seed."""
    return {f"{prefix}{mode}-seed{seed}": [*flags, *decoder_flags, "--seed", str(seed)]
            for prefix, decoder_flags in DECODERS.values() for mode, flags in CONDITIONINGS.items() for seed in SEEDS}


def recurrent_runs():
    """{run name: train.py flags} of the recurrent decoder: conditioning x seed with the schedule of
    teacher forcing, and mix-and-match and fixed always teacher-forced."""
    prefix, decoder_flags = RECURRENT
    runs = {f"{prefix}{mode}-seed{seed}": [*flags, *decoder_flags, "--seed", str(seed)]
            for mode, flags in CONDITIONINGS.items() for seed in SEEDS}
    prefix, decoder_flags, modes = ALWAYS_FORCED
    runs.update({f"{prefix}{mode}-seed{seed}": [*CONDITIONINGS[mode], *decoder_flags, "--seed", str(seed)]
                 for mode in modes for seed in SEEDS})
    return runs


def expressive_runs(modes):
    """{run name: train.py flags} of the latent-use and recurrent runs (the recurrent with the
    schedule) of the expressive decoders with these conditionings: the plain runs that sections
    "fixes" and "mechanism" stand beside, named alike so that they are trained once."""
    starts = tuple(f"{prefix}{mode}-" for prefix, _ in EXPRESSIVE.values() for mode in modes)
    return {name: flags for name, flags in {**latent_runs(), **recurrent_runs()}.items() if name.startswith(starts)}


def fix_prefix(prefix, tag, value, mode="concat"):
    """The run-name prefix of a decoder's conditioning with a fix: "ar-concat-fb0.25"."""
    return f"{prefix}{mode}-{tag}{value:g}"


def fix_runs(prefix, fix, value, seeds, mode="concat"):
    """{run name: train.py flags} of a conditioning with a fix at a value, with the decoder of prefix."""
    decoder_flags = next(flags for p, flags in EXPRESSIVE.values() if p == prefix)
    flag, tag, _ = FIXES[fix]
    return {f"{fix_prefix(prefix, tag, value, mode)}-seed{seed}": [*CONDITIONINGS[mode], *decoder_flags, flag,
                                                                   f"{value:g}", "--seed", str(seed)]
            for seed in seeds}


def picked_values(metrics):
    """{(decoder's run-name prefix, fix): the value its seed-0 sweep picks}, the one with the most
    diversity from z alone (what the fix is for; the sweep's table shows what it costs), for each
    sweep whose runs are all measured."""
    picks = {}
    for prefix, _ in EXPRESSIVE.values():
        for fix, (_, tag, values) in FIXES.items():
            runs = [metrics.get(f"{fix_prefix(prefix, tag, value)}-seed0-T1") for value in values]
            if None not in runs:
                picks[prefix, fix] = max(zip(values, runs), key=lambda v: v[1]["metrics"]["diversity_z"]["model"])[0]
    return picks


def better_fixes(metrics, picks):
    """{decoder's run-name prefix: the fix whose concat runs, at its picked value, have the more
    diversity from z alone over the seeds}, for each decoder whose fixes' seeds are all measured."""
    better = {}
    for prefix, _ in EXPRESSIVE.values():
        names = {fix: [f"{fix_prefix(prefix, FIXES[fix][1], picks[prefix, fix])}-seed{seed}-T1" for seed in SEEDS]
                 for fix in FIXES if (prefix, fix) in picks}
        if len(names) == len(FIXES) and all(metrics.get(n) for runs in names.values() for n in runs):
            better[prefix] = max(names, key=lambda fix: statistics.mean(
                metrics[n]["metrics"]["diversity_z"]["model"] for n in names[fix]))
    return better


def fixes_runs(args):
    """{run name: train.py flags} of section "fixes", each part once the one before is measured:
    the sweep and the plain runs of each expressive decoder; seeds 1 and 2 of each fix at its
    picked value; mix-and-match with the better fix, seeds 0, 1 and 2 (do they add up?)."""
    runs = {name: flags for prefix, _ in EXPRESSIVE.values() for fix, (_, _, values) in FIXES.items()
            for value in values for name, flags in fix_runs(prefix, fix, value, [0]).items()}
    runs.update(expressive_runs(CONDITIONINGS))
    picks = picked_values(measured(args, runs))
    for (prefix, fix), value in picks.items():
        runs.update(fix_runs(prefix, fix, value, SEEDS[1:]))
    for prefix, fix in better_fixes(measured(args, runs), picks).items():
        runs.update(fix_runs(prefix, fix, picks[prefix, fix], SEEDS, "mix-and-match"))
    return runs


def mechanism_runs():
    """{run name: train.py flags} of section "mechanism": with each expressive decoder, the Sampling
    redrawn on one side only ("ar-random-decoder-seed0": tests/one_side_random.py trains it), and
    mix-and-match and fixed, the runs of "latent-use" and "recurrent"."""
    runs = {f"{prefix}random-{side}-seed{seed}": [*flags, "--seed", str(seed)]
            for prefix, flags in EXPRESSIVE.values() for side in SIDES for seed in SEEDS}
    runs.update(expressive_runs(("mix-and-match", "fixed")))
    return runs


def through(run_name, script):
    """The script and its first flags for a run: a variant of section "mechanism" goes through
    tests/one_side_random.py, for its training and its measurements alike."""
    side = next((side for side in SIDES if f"random-{side}-" in run_name), None)
    return (script,) if side is None else (os.path.join("tests", "one_side_random.py"), side, script)


def measured(args, runs):
    """{measurement name: its JSON} of the runs measured at T = 1 so far."""
    return {f"{name}-T1": m for name in runs if (m := read_measurement(args, f"{name}-T1")) is not None}


def fixes_rows(picks, better):
    """(row label, run-name prefix) of README's table of fixes: per decoder, the three conditionings,
    concat with each fix at its picked value, and mix-and-match with the better fix."""
    rows = []
    for decoder, (prefix, _) in EXPRESSIVE.items():
        rows += [(f"{decoder}, {mode}", f"{prefix}{mode}") for mode in CONDITIONINGS]
        rows += [(f"{decoder}, {mode} + {fix} {picks[prefix, fix]:g}",
                  fix_prefix(prefix, FIXES[fix][1], picks[prefix, fix], mode))
                 for fix, mode in [*((fix, "concat") for fix in FIXES), (better[prefix], "mix-and-match")]]
    return rows


def fixes_pairs(picks, better):
    """Each fix against Mix-and-Match and against the plain concat; Mix-and-Match with the better
    fix against Mix-and-Match and against concat with that fix; all with the same decoder."""
    pairs = []
    for prefix, _ in EXPRESSIVE.values():
        for fix, (_, tag, _) in FIXES.items():
            pairs += [(fix_prefix(prefix, tag, picks[prefix, fix]), f"{prefix}{mode}")
                      for mode in ("mix-and-match", "concat")]
        fix, tag = better[prefix], FIXES[better[prefix]][1]
        both = fix_prefix(prefix, tag, picks[prefix, fix], "mix-and-match")
        pairs += [(both, f"{prefix}mix-and-match"), (both, fix_prefix(prefix, tag, picks[prefix, fix]))]
    return pairs


def grid_and_long_prefix(section):
    """The runs of a latent-use section, and the run-name prefix of those continued to LONG_EPOCHS."""
    return (latent_runs(), "ar-") if section == "latent-use" else (recurrent_runs(), RECURRENT[0])


def training_runs(section, args):
    """{run name: (train.py flags, epochs, the run it continues or None)} for a section's trainings."""
    if section == "fixes":
        return {name: (flags, EPOCHS, None) for name, flags in fixes_runs(args).items()}
    if section == "mechanism":
        return {name: (flags, EPOCHS, None) for name, flags in mechanism_runs().items()}
    if section in ("latent-use", "recurrent"):
        grid, prefix = grid_and_long_prefix(section)
        # the longest chains first (seed 0, then its continuation), so that two reproductions share the work
        runs = {f"{prefix}{mode}-seed0": (grid[f"{prefix}{mode}-seed0"], EPOCHS, None) for mode in CONDITIONINGS}
        runs.update({f"{prefix}{mode}-seed0-long": ([], LONG_EPOCHS, f"{prefix}{mode}-seed0")
                     for mode in CONDITIONINGS})
        runs.update({name: (flags, EPOCHS, None) for name, flags in grid.items() if name not in runs})
        return runs
    runs = {f"{mode}-seed{seed}": [*flags, "--seed", str(seed)] for mode, flags in MODES.items() for seed in SEEDS}
    runs.update({f"{mode}-alpha{alpha}": [*MODES[mode], "--alpha", str(alpha)]
                 for mode in ("mix-and-match", "fixed") for alpha in TRAIN_ALPHAS})
    return {name: (flags, EPOCHS, None) for name, flags in runs.items()}


def measurements(section, args=None):
    """{measurement name: (run name, sample.py flags)} for a section's metrics runs."""
    if section == "fixes":
        return {f"{name}-T1": (name, []) for name in fixes_runs(args)}
    if section == "mechanism":
        return {f"{name}-T1": (name, []) for name in mechanism_runs()}
    if section in ("latent-use", "recurrent"):
        grid, prefix = grid_and_long_prefix(section)
        todo = {f"{name}-T1": (name, []) for name in grid}
        todo.update({f"{prefix}{mode}-seed0-long-T1": (f"{prefix}{mode}-seed0-long", []) for mode in CONDITIONINGS})
        return todo
    todo = {f"{mode}-seed{seed}-T1": (f"{mode}-seed{seed}", []) for mode in MODES for seed in SEEDS}
    todo["shipped-T1"] = ("shipped", [])  # trained on another CPU: its own column
    todo.update({f"{mode}-seed0-T{t:g}": (f"{mode}-seed0", ["--temperature", f"{t:g}"])
                 for mode in MODES for t in TEMPERATURES})
    todo.update({f"mix-and-match-seed0-testalpha{alpha}-T{t:g}": ("mix-and-match-seed0",
                                                                  ["--alpha", str(alpha), "--temperature", f"{t:g}"])
                 for alpha in TEST_ALPHAS for t in TEST_ALPHA_TEMPERATURES})
    todo.update({f"{mode}-alpha{alpha}-T1": (f"{mode}-alpha{alpha}", [])
                 for mode in ("mix-and-match", "fixed") for alpha in TRAIN_ALPHAS})
    return todo


def final_checkpoint(args, run, epochs=None):
    if run == "shipped":
        return SHIPPED
    epochs = epochs or (LONG_EPOCHS if run.endswith("-long") else EPOCHS)
    return os.path.join(args.runs_dir, run, "checkpoint", f"mix_match_{epochs:02d}.pth")


def train(args, name, flags, epochs, start, progress):
    """Train one run to `epochs`; a run that continues another (`start`) begins from that run's last
    checkpoint, in a folder of its own so that the shorter run stays as it was. Returns whether the
    run is done (False: another reproduction is training it, or the run it continues)."""
    if os.path.isfile(final_checkpoint(args, name, epochs)):
        return True
    if start and not os.path.isfile(final_checkpoint(args, start)):
        print(f"{progress} {name}: waits for {start}, which another reproduction is training")
        return False
    folder = os.path.join(args.runs_dir, name)
    with claimed(os.path.join(folder, "train.lock"), f"{progress} {name}") as mine:
        if mine:
            # an interrupted reproduction continues the run from its newest epoch (by number: 187 after 99)
            done = max(glob.glob(os.path.join(folder, "checkpoint", "mix_match_*.pth")), default=None,
                       key=lambda path: int(path.rsplit("_", 1)[1].removesuffix(".pth")))
            resume = done or (final_checkpoint(args, start) if start else None)
            run(f"{progress} training {name}" + (f", from {resume}" if resume else ""),
                os.path.join(folder, "train.log"), *through(name, "train.py"), "--data-root", args.data_root,
                "--checkpoint-dir", os.path.join(folder, "checkpoint"), "--results-dir",
                os.path.join(folder, "results"), "--epochs", str(epochs), *flags,
                *(["--resume", resume] if resume else []))
    return mine


def read_measurement(args, name):
    """The measurement's JSON as sample.py wrote it, or None if it is missing or was left broken
    (cut short, edited by another tool)."""
    try:
        with open(os.path.join(args.runs_dir, "metrics", f"{name}.json")) as f:
            measurement = json.load(f)
    except (OSError, ValueError):
        return None
    return measurement if isinstance(measurement, dict) and isinstance(measurement.get("metrics"), dict) else None


def measure(args, name, run_name, flags, progress):
    """Measure one run; returns whether the measurement is done (False: its run is not, or another
    reproduction is measuring it). A JSON there that is broken is measured again."""
    folder = os.path.join(args.runs_dir, "metrics")
    if read_measurement(args, name) is not None:
        return True
    if os.path.isfile(os.path.join(folder, f"{name}.json")):
        print(f"{progress} {name}: its JSON is broken (not sample.py's metrics); measuring it again")
    if not os.path.isfile(final_checkpoint(args, run_name)):
        return False
    with claimed(os.path.join(folder, f"{name}.lock"), f"{progress} {name}") as mine:
        if mine:
            run(f"{progress} measuring {name}", os.path.join(folder, f"{name}.log"), *through(run_name, "sample.py"),
                "--data-root", args.data_root, "--checkpoint", final_checkpoint(args, run_name), "--metrics",
                "--json", os.path.join(folder, f"{name}.json"), "--out", os.path.join(folder, f"{name}.png"), *flags)
    return mine


@contextlib.contextmanager
def claimed(lock, what):
    """Yields True while this process holds `lock`, False if another live reproduction holds it (a
    lock left by one that was killed is taken over)."""
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with process_lock(lock) as holder:
        if holder:
            print(f"{what}: another reproduction (process {holder}) is on it")
        yield not holder


def run(what, log, script, *script_args):
    """One script, its output in `log`; a failure stops the reproduction with its last lines."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    t0 = time.time()
    print(what, end="", flush=True)
    with open(log, "w") as f:
        result = subprocess.run([sys.executable, os.path.join(REPO, script), *script_args], cwd=REPO,
                                stdout=f, stderr=subprocess.STDOUT, check=False)
    print(f": {time.time() - t0:.0f} s", flush=True)
    if result.returncode != 0:
        with open(log) as f:
            tail = f.read()[-2000:]
        sys.exit(f"{tail}\nerror: {script} failed (exit {result.returncode}), its log: {log}. "
                 f"Fix the cause and run this command again: it continues where it stopped.")


def checkpoint_history(args, run, epochs=EPOCHS):
    return torch.load(final_checkpoint(args, run, epochs), weights_only=True)["history"]


# ----------------------------------------------------------------------------- tables

def seed_values(metrics, mode, key):
    return [metrics[f"{mode}-seed{seed}-T1"]["metrics"][key]["model"] for seed in SEEDS]


def mean_sd(values):
    """Mean and sample standard deviation (n - 1) over the seeds."""
    return statistics.mean(values), statistics.stdev(values)


def mean_sd_cell(values):
    """'mean ± sd', or 'n/a' for a measure the conditioning does not have (diversity from the
    Sampling alone where I never changes)."""
    return "n/a" if None in values else "{:.3f} ± {:.3f}".format(*mean_sd(values))


def difference(metrics, key, a, b):
    """a's mean minus b's over the seeds, twice the larger of their sds, and whether the difference
    is the larger (the only differences README reads as findings); None where a measure is n/a."""
    values_a, values_b = seed_values(metrics, a, key), seed_values(metrics, b, key)
    if None in values_a or None in values_b:
        return None
    (mean_a, sd_a), (mean_b, sd_b) = mean_sd(values_a), mean_sd(values_b)
    return mean_a - mean_b, 2 * max(sd_a, sd_b), abs(mean_a - mean_b) > 2 * max(sd_a, sd_b)


def seed_table(metrics):
    """README's Results table: each metric of sample.py --metrics as mean ± sd over the seeds, per
    mode; the real tops' value (the same for every run: one classifier, one test set); and the
    shipped checkpoint's value as `sample.py --metrics` prints it."""
    shipped = metrics["shipped-T1"]["metrics"]
    lines = [f"| metric (per test image), mean ± sd over seeds {', '.join(map(str, SEEDS))} | "
             + " | ".join(MODES) + " | real top | shipped model (seed 0) |", "|---|" + "---:|" * (len(MODES) + 2)]
    for key, row in shipped.items():
        cells = [mean_sd_cell(seed_values(metrics, mode, key)) for mode in MODES]
        real = "" if row["real_top"] is None else f"{row['real_top']:.3f}"
        value = f"{row['model']:d}" if isinstance(row["model"], int) else f"{row['model']:.3f}"
        lines.append(f"| {markdown(row['name'])} | " + " | ".join(cells) + f" | {real} | {value} |")
    return "\n".join(lines)


def differences_table(metrics):
    """Each difference between modes beside twice the larger of the two seed spreads (sd); 'yes'
    where the difference is the larger, the only differences README reads as findings."""
    pairs = [("mix-and-match", "fixed"), ("curriculum", "mix-and-match")]
    lines = ["| metric | " + " | ".join(f"{a} − {b} | 2 × sd | beyond?" for a, b in pairs) + " |",
             "|---|" + "---:|---:|:---:|" * len(pairs)]
    for key, row in metrics[f"mix-and-match-seed{SEEDS[0]}-T1"]["metrics"].items():
        cells = ["n/a | | " if d is None else f"{d[0]:+.3f} | {d[1]:.3f} | {'yes' if d[2] else 'no'}"
                 for d in (difference(metrics, key, a, b) for a, b in pairs)]
        lines.append(f"| {markdown(row['name'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# the measures of latent use, and what it costs or buys (README, "Does Mix-and-Match keep the latent in use?")
LATENT_KEYS = ("kl", "active_units", "diversity_z", "diversity_sampling", "diversity", "iw_nll", "neg_elbo",
               "best_of_k", "mm_best_of_k", "precision", "density", "coverage", "frechet", "confidence",
               "distinct_digits")
# README's table of fixes: the latent in use, the fit, fidelity and coverage against real digits
FIXES_KEYS = ("kl", "active_units", "diversity_z", "diversity", "iw_nll", "precision", "coverage", "frechet")
# section "mechanism": where the Sampling is redrawn (row label, run-name part), and what it changes
MECHANISM_ROWS = (("redrawn on both sides (mix-and-match)", "mix-and-match"),
                  *((f"redrawn on the {side} side only", f"random-{side}") for side in SIDES),
                  ("redrawn on neither (fixed)", "fixed"))
MECHANISM_KEYS = ("kl", "active_units", "diversity_z", "diversity_sampling", "iw_nll", "coverage", "frechet")


def latent_columns():
    """(column label, run-name prefix) of each decoder and conditioning."""
    return [(f"{decoder}, {mode}", f"{prefix}{mode}") for decoder, (prefix, _) in DECODERS.items()
            for mode in CONDITIONINGS]


def latent_pairs():
    """Mix-and-Match against each deterministic conditioning with the same decoder, and each
    conditioning's autoregressive decoder against its MLP one."""
    pairs = [("ar-mix-and-match", f"ar-{mode}") for mode in CONDITIONINGS if mode != "mix-and-match"]
    pairs += [("mix-and-match", mode) for mode in CONDITIONINGS if mode != "mix-and-match"]
    return pairs + [(f"ar-{mode}", mode) for mode in CONDITIONINGS]


def recurrent_columns():
    columns = [(f"recurrent, {mode}", f"{RECURRENT[0]}{mode}") for mode in CONDITIONINGS]
    prefix, _, modes = ALWAYS_FORCED
    return columns + [(f"recurrent always teacher-forced, {mode}", f"{prefix}{mode}") for mode in modes]


def recurrent_pairs():
    """Mix-and-Match against each deterministic conditioning, with and without the schedule; and
    the schedule against teacher forcing throughout."""
    return [("rnn-mix-and-match", "rnn-fixed"), ("rnn-mix-and-match", "rnn-concat"),
            ("rnn-tf-mix-and-match", "rnn-tf-fixed"), ("rnn-mix-and-match", "rnn-tf-mix-and-match"),
            ("rnn-fixed", "rnn-tf-fixed")]


def latent_table(metrics, columns):
    """Each latent-use measure as mean ± sd over the seeds, per column (label, run-name prefix)."""
    names = next(iter(metrics.values()))["metrics"]
    lines = [f"| metric (per test image), mean ± sd over seeds {', '.join(map(str, SEEDS))} | "
             + " | ".join(label for label, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for key in LATENT_KEYS:
        cells = [mean_sd_cell(seed_values(metrics, prefix, key)) for _, prefix in columns]
        lines.append(f"| {markdown(names[key]['name'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latent_differences_table(metrics, pairs, keys=LATENT_KEYS):
    """For each pair (a, b) of run-name prefixes: a − b (twice the larger seed sd, and ", yes" where
    the difference is beyond it), for each measure of keys."""
    names = next(iter(metrics.values()))["metrics"]
    labels = [f"{run_label(a)} − {run_label(b)}" for a, b in pairs]
    lines = ["| metric: a − b (2 × sd) | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(pairs)]
    for key in keys:
        cells = ["n/a" if d is None else f"{d[0]:+.3f} ({d[1]:.3f}{', yes' * d[2]})"
                 for d in (difference(metrics, key, a, b) for a, b in pairs)]
        lines.append(f"| {markdown(names[key]['name'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fixes_tables(metrics):
    """README's tables of fixes: each method over the seeds, the seed-0 sweep, and the differences."""
    picks = picked_values(metrics)
    better = better_fixes(metrics, picks)
    return [methods_table(metrics, fixes_rows(picks, better)), sweep_table(metrics),
            latent_differences_table(metrics, fixes_pairs(picks, better), FIXES_KEYS)]


def methods_table(metrics, rows, keys=FIXES_KEYS):
    """One row per method (label, run-name prefix), one column per measure of keys, each as mean ±
    sd over the seeds."""
    names = next(iter(metrics.values()))["metrics"]
    lines = [f"| method, mean ± sd over seeds {', '.join(map(str, SEEDS))} | "
             + " | ".join(markdown(names[key]["name"]) for key in keys) + " |", "|---|" + "---:|" * len(keys)]
    for label, prefix in rows:
        lines.append(f"| {label} | " + " | ".join(mean_sd_cell(seed_values(metrics, prefix, key))
                                                 for key in keys) + " |")
    return "\n".join(lines)


def mechanism_tables(metrics):
    """README's table of section "mechanism": per expressive decoder, the Sampling redrawn on both
    sides (mix-and-match), the decoder's only, the encoder's only, and neither (fixed); and each
    one-side variant against both ends."""
    rows, pairs = [], []
    for decoder, (prefix, _) in EXPRESSIVE.items():
        rows += [(f"{decoder}, {label}", f"{prefix}{run}") for label, run in MECHANISM_ROWS]
        pairs += [(f"{prefix}random-{side}", f"{prefix}{mode}") for side in SIDES
                  for mode in ("mix-and-match", "fixed")]
    return [methods_table(metrics, rows, MECHANISM_KEYS), latent_differences_table(metrics, pairs, MECHANISM_KEYS)]


def sweep_table(metrics):
    """The fixes' seed-0 sweep: one row per decoder, fix and value, beside the plain concat's seed 0."""
    names = next(iter(metrics.values()))["metrics"]
    lines = ["| seed 0, concat | " + " | ".join(markdown(names[key]["name"]) for key in FIXES_KEYS) + " |",
             "|---|" + "---:|" * len(FIXES_KEYS)]
    for decoder, (prefix, _) in EXPRESSIVE.items():
        rows = [(f"{decoder}, no fix", f"{prefix}concat")]
        rows += [(f"{decoder}, {fix} {value:g}", fix_prefix(prefix, tag, value))
                 for fix, (_, tag, values) in FIXES.items() for value in values]
        for label, run in rows:
            values = [metrics[f"{run}-seed0-T1"]["metrics"][key]["model"] for key in FIXES_KEYS]
            lines.append(f"| {label} | " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


def cell(value):
    return "n/a" if value is None else f"{value:d}" if isinstance(value, int) else f"{value:.3f}"


def run_label(prefix):
    """A run-name prefix as a table reads it: "rnn-tf-fixed" -> "recurrent always teacher-forced fixed"."""
    for flag, tag, _ in FIXES.values():  # "ar-concat-fb0.25" -> "autoregressive concat --free-bits 0.25"
        if f"-{tag}" in prefix:
            run, value = prefix.rsplit(f"-{tag}", 1)
            return f"{run_label(run)} {flag} {value}"
    for short, long in (("rnn-tf-", "recurrent always teacher-forced "), ("rnn-", "recurrent "),
                        ("ar-", "autoregressive ")):
        if prefix.startswith(short):
            return long + prefix.removeprefix(short)
    return prefix


def long_table(metrics, prefix):
    """The seed-0 runs of a decoder (run-name prefix) at EPOCHS and at LONG_EPOCHS."""
    names = next(iter(metrics.values()))["metrics"]
    columns = [(f"{mode}, epoch {epochs}", f"{prefix}{mode}-seed0{suffix}-T1") for mode in CONDITIONINGS
               for epochs, suffix in [(EPOCHS, ""), (LONG_EPOCHS, "-long")]]
    lines = [f"| {run_label(prefix)}decoder, seed 0 | " + " | ".join(label for label, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for key in LATENT_KEYS:
        values = [metrics[name]["metrics"][key]["model"] for _, name in columns]
        lines.append(f"| {markdown(names[key]['name'])} | " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


def markdown(text):
    return text.replace("|", "\\|")  # a bare | would end the table cell


def point(measurement, x="distinct_digits", y="confidence"):
    return measurement["metrics"][x]["model"], measurement["metrics"][y]["model"]


def fidelity_key(metrics):
    """Which fidelity measure is the frontier's quality axis: precision or density, whichever varies
    less between the seeds at T = 1 (its sd over its mean, averaged over the conditionings)."""
    def relative_spread(key):
        return statistics.mean(sd / mean for mean, sd in (mean_sd(seed_values(metrics, mode, key)) for mode in MODES))
    return min(("precision", "density"), key=relative_spread)


def frontier_table(metrics):
    """Every frontier point (seed 0): temperature curves, test-time alphas and trained alphas, with
    their fidelity, confidence and coverage, beside the fidelity and the confidence each
    conditioning's temperature curve has at the same diversity (linear between its temperatures;
    distinct digits grow with T along every curve)."""
    fidelity = fidelity_key(metrics)
    curves = {(mode, y): [point(metrics[f"{mode}-seed0-T{t:g}"], y=y) for t in TEMPERATURES]
              for y in (fidelity, "confidence") for mode in ("fixed", "mix-and-match")}
    header = (f"| model (seed 0) | T | distinct digits | mean distance | {fidelity} | confidence | coverage | "
              + " | ".join(f"{mode}'s {y} at these digits" for mode, y in curves) + " |")
    lines = [header, "|---|" + "---:|" * (6 + len(curves))]
    for name in frontier_points():
        m = metrics[name]
        label = name.rsplit("-T", 1)[0].replace("-seed0", "").replace("testalpha", "test-time alpha ")
        values = [m["metrics"][key]["model"] for key in ("distinct_digits", "diversity", fidelity, "confidence",
                                                          "coverage")]
        on_curves = [on_curve(curve, values[0]) for curve in curves.values()]
        cells = [f"{v:.3f}" for v in values] + ["" if v is None else f"{v:.3f}" for v in on_curves]
        lines.append(f"| {label} | {m['temperature']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_points():
    """The measurements of the frontier, each conditioning's temperatures in order, then alphas."""
    names = [f"{mode}-seed0-T{t:g}" for mode in MODES for t in TEMPERATURES]
    names += [f"mix-and-match-seed0-testalpha{a}-T{t:g}" for a in TEST_ALPHAS for t in TEST_ALPHA_TEMPERATURES]
    return names + [f"{mode}-alpha{a}-T1" for mode in ("mix-and-match", "fixed") for a in TRAIN_ALPHAS]


def on_curve(curve, x):
    """The y of a curve of (x, y) points at x, linear between neighbouring points; None outside
    the x the curve spans."""
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if min(x0, x1) <= x <= max(x0, x1):
            return y0 if x0 == x1 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


# ----------------------------------------------------------------------------- figure

def plot_frontier(metrics, path):
    """Quality against diversity (distinct digits), one line per conditioning through its
    temperatures (seed 0), the seed spread at T = 1 as error bars (mean ± sd), trained and
    test-time alphas as labelled points, the real digits' value as a reference line. Three
    panels, three qualities: fidelity against real digits (precision or density, fidelity_key),
    the classifier's confidence, and coverage of the real digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fidelity = fidelity_key(metrics)
    panels = [(fidelity, f"fidelity: {fidelity} against real test digits"),
              ("confidence", "classifier confidence"), ("coverage", "coverage of the real test digits (k = 5)")]
    colors = dict(zip(MODES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), gridspec_kw={
        "left": 0.05, "right": 0.99, "bottom": 0.24, "top": 0.9, "wspace": 0.22})
    x_key = "distinct_digits"
    for ax, (y_key, y_label) in zip(axes, panels):
        for mode, color in colors.items():
            curve = [point(metrics[f"{mode}-seed0-T{t:g}"], x_key, y_key) for t in TEMPERATURES]
            ax.plot(*zip(*curve), color=color, marker="o", markersize=3.5, label=f"{mode}: T = "
                    f"{', '.join(f'{t:g}' for t in TEMPERATURES)}")
            for t, (x, y) in zip(TEMPERATURES, curve):
                if t in (TEMPERATURES[0], 1.0, TEMPERATURES[-1]):
                    ax.annotate(f"T {t:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
            (x_mean, x_sd), (y_mean, y_sd) = (mean_sd(seed_values(metrics, mode, key)) for key in (x_key, y_key))
            ax.errorbar(x_mean, y_mean, xerr=x_sd, yerr=y_sd, color=color, capsize=3, linewidth=1.2,
                        label=f"{mode}: seeds {', '.join(map(str, SEEDS))} at T = 1, mean ± sd")
            for alpha in TRAIN_ALPHAS if mode != "curriculum" else ():
                x, y = point(metrics[f"{mode}-alpha{alpha}-T1"], x_key, y_key)
                ax.plot(x, y, marker="s", color=color, markersize=5, markerfacecolor="white")
                ax.annotate(f"α {alpha}", (x, y), textcoords="offset points", xytext=(4, -9), fontsize=7, color=color)
        for alpha in TEST_ALPHAS:
            for t in TEST_ALPHA_TEMPERATURES:
                x, y = point(metrics[f"mix-and-match-seed0-testalpha{alpha}-T{t:g}"], x_key, y_key)
                ax.plot(x, y, marker="^", color=colors["mix-and-match"], markersize=6, markerfacecolor="white")
                ax.annotate(f"test α {alpha}, T {t:g}", (x, y), textcoords="offset points", xytext=(4, 3),
                            fontsize=7, color=colors["mix-and-match"])
        real = metrics[f"mix-and-match-seed{SEEDS[0]}-T1"]["metrics"][y_key]["real_top"]
        ax.axhline(real, color="grey", linestyle="--", linewidth=1, label=f"real digits: {real:.3f}")
        ax.set(xlabel="diversity: distinct digits among the 18 completions", ylabel=y_label)
        ax.grid(alpha=0.3)
    axes[0].plot([], [], "ks", markerfacecolor="white", label="trained with another alpha (T = 1)")
    axes[0].plot([], [], "k^", markerfacecolor="white", label="default model, test-time alpha")
    fig.suptitle("Quality against diversity (seed 0 along each line; up and right is better; dashed: real digits "
                 "in the completions' place)")
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(1.7, -0.13), ncol=4, frameon=False)
    save_figure(fig, path, dpi=100)


if __name__ == "__main__":
    main()
