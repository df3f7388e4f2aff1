"""The reproduction's records (tests/reproduce_results.py): a tiny reproduction trains, measures
and records its runs with two workers, --verify trains one again and compares, and --tables
writes the documents' tables from records alone, or says which it cannot. Records that are broken,
of another shape, too large a number, in a loop or under another run's name, table markers
without their pair and folders where a table belongs each end in one line with the documents as
they were; a SIGTERM ends the reproduction and its scripts, between whole files."""
import argparse
import contextlib
import json
import os
import pathlib
import re
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest
import torch

import reproduce_documents
import reproduce_plan
import reproduce_results
import reproduce_runs
from conftest import edit_record, records_copy, refused, write_records

TINY = {"tiny-seed0": ([], 1, None), "tiny-seed0-long": ([], 2, "tiny-seed0"), "tiny-seed1": (["--seed", "1"], 1, None)}
TINY_MEASURES = {"tiny-seed0-T1": ("tiny-seed0", []), "tiny-seed0-long-T1": ("tiny-seed0-long", []),
                 "tiny-seed1-T1": ("tiny-seed1", []), "tiny-seed1-T2": ("tiny-seed1", ["--temperature", "2"])}


@pytest.fixture
def tiny(monkeypatch, tmp_path, mnist_root):
    """reproduce_results with a plan of three tiny runs (one continued), measured with few images,
    its runs and records in tmp_path, train.py and sample.py run in this process (no torch import
    each): main(*flags) -> its exit code; main.threads, the --threads each script was run with."""
    monkeypatch.setattr(reproduce_results, "plan", lambda args, sections: (TINY, TINY_MEASURES))
    monkeypatch.setattr(reproduce_plan, "MEASURE_FLAGS", ["--n-eval", "20", "--n-samples", "4", "--n-importance",
                                                          "4", "--cache-dir", str(tmp_path / "cache")])
    documents, threads = [], []
    monkeypatch.setattr(reproduce_documents, "write_documents", lambda records_dir, check=False: documents.append(1))

    def in_process(args, what, log, script, *script_args):
        print(what)
        threads.append(args.threads)
        os.makedirs(os.path.dirname(log), exist_ok=True)
        handler = signal.getsignal(signal.SIGTERM)  # train.py installs its own
        with open(log, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            monkeypatch.setattr(sys, "argv", [script, *script_args])
            with contextlib.suppress(SystemExit):
                runpy.run_path(os.path.join(reproduce_plan.REPO, script), run_name="__main__")
        signal.signal(signal.SIGTERM, handler)
        return 1.0
    monkeypatch.setattr(reproduce_runs, "run", in_process)

    def main(*flags):
        monkeypatch.setattr(sys, "argv", ["reproduce_results.py", "--data-root", mnist_root, "--runs-dir",
                                          str(tmp_path / "runs"), "--records-dir", str(tmp_path / "records"), *flags])
        with pytest.raises(SystemExit) as e:
            reproduce_results.main()
        return e.value.code
    (tmp_path / "records").mkdir()
    main.documents, main.threads = documents, threads
    return main


def read(tmp_path, run):
    return json.loads((tmp_path / "records" / f"{run}.json").read_text(encoding="utf-8"))


def test_a_reproduction_records_each_run_and_verify_trains_one_again(tiny, tmp_path, capsys):
    assert tiny("--threads", "3") in (None, 0)
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == sorted(f"{run}.json" for run in TINY)
    assert out.count("training tiny-seed0\n") == 1 and "3/3 runs recorded" in out and tiny.documents == [1]
    long = read(tmp_path, "tiny-seed0-long")
    assert long["train"] == {"script": ["train.py"], "flags": [], "epochs": 2, "continues": "tiny-seed0",
                             "first_epoch": 2, "seconds": long["history"][1]["seconds"]}
    assert [h["epoch"] for h in long["history"]] == [1, 2] and long["threads"] == 3 and long["cpu"]
    assert long["commit"] and long["cpu_capability"] and all(long[key] for key in reproduce_plan.VERSIONS)
    seed1 = read(tmp_path, "tiny-seed1")
    assert list(seed1["measurements"]) == ["tiny-seed1-T1", "tiny-seed1-T2"]
    measured = seed1["measurements"]["tiny-seed1-T2"]
    assert measured["flags"][:2] == ["--temperature", "2"] and measured["seconds"] == 1.0
    sample_json = json.loads((tmp_path / "runs" / "metrics" / "tiny-seed1-T2.json").read_text(encoding="utf-8"))
    assert measured["metrics"] == sample_json and sample_json["temperature"] == 2  # exactly as sample.py wrote it

    assert tiny() in (None, 0) and "training" not in capsys.readouterr().out  # all recorded: nothing again
    # another machine sharing the runs folder trained tiny-seed1; this one writes its record, with that
    # machine's provenance, and trains and measures nothing
    environment = json.loads((tmp_path / "runs" / "tiny-seed1" / "environment.json").read_text(encoding="utf-8"))
    assert environment == {key: seed1[key] for key in ("commit", *reproduce_plan.VERSIONS, "cpu", "cpu_capability",
                                                       "threads")}
    (tmp_path / "runs" / "tiny-seed1" / "environment.json").write_text(json.dumps({**environment, "cpu": "Other"}),
                                                                        encoding="utf-8")
    (tmp_path / "records" / "tiny-seed1.json").unlink()
    assert tiny() in (None, 0)
    out = capsys.readouterr().out
    assert "training" not in out and "measuring" not in out and read(tmp_path, "tiny-seed1")["cpu"] == "Other"
    # the continued run again from nothing, on this machine: equal to its record, bit for bit, and
    # trained and measured with the record's thread count
    tiny.threads.clear()
    assert tiny("--verify", "tiny-seed0-long") == 0
    out = capsys.readouterr().out
    assert "training tiny-seed0\n" in out and "tiny-seed0-long agrees with its record bit for bit" in out
    assert tiny.threads == [3, 3, 3]
    # a record that the run does not give (what --verify compares the run measured again with)
    again, record = read(tmp_path, "tiny-seed0-long"), read(tmp_path, "tiny-seed0-long")
    record["measurements"]["tiny-seed0-long-T1"]["metrics"]["metrics"]["kl"]["model"] += 1e-6
    record["history"][0]["test_loss"] += 1
    assert reproduce_results.compare(record, again, {}) == 1
    out = capsys.readouterr().out
    assert out.startswith("tiny-seed0-long does not agree with its record: 2 of ")  # the verdict first
    most_different = out.split("\nthe most different:\n", 1)[1].split("\n\n")[0].splitlines()[1:]
    assert sorted(line.split()[0] for line in most_different) == ["T1", "epoch"]  # T1 kl; epoch 1 test_loss
    assert tiny("--verify", "tiny-seed7") == ("error: no record of a run named 'tiny-seed7'; the runs recorded: "
                                              "tiny-seed0, tiny-seed0-long, tiny-seed1")


def hand_made(run, kl, cpu="Intel", capability="AVX512", torch_version="2.14.1", losses=(80.0,), units=32):
    """A record of one measurement at T = 1 (its KL, its active units, a measure that is n/a) and a
    history of test losses."""
    return {"run": run, "train": None, "config": {}, "commit": "c", "torch": torch_version, "cpu": cpu,
            "cpu_capability": capability, "threads": 1,
            "history": [{"epoch": e, "test_loss": loss, "seconds": 1.0} for e, loss in enumerate(losses, 1)],
            "measurements": {f"{run}-T1": {"flags": [], "seconds": 1.0, "metrics": {"classifier_accuracy": 0.9913,
                                                                                 "temperature": 1.0, "metrics": {
                "kl": {"name": "KL", "model": kl, "real_top": None},
                "active_units": {"name": "active units", "model": units, "real_top": None},
                "diversity_sampling": {"name": "n/a here", "model": None, "real_top": None}}}}}}


def seeds(epochs=1):
    """Seeds 0, 1, 2 of mix-and-match with KLs 10, 11, 12 and test losses 80, 81, 82 at each epoch:
    a seed sd of 1 for both, none for the active units (32 in every seed)."""
    return {f"mix-and-match-seed{s}": hand_made(f"mix-and-match-seed{s}", 10 + s, losses=[80.0 + s] * epochs)
            for s in SEEDS}


SEEDS = (0, 1, 2)


def verify_out(capsys, record, again, records):
    code = reproduce_results.compare(record, again, records)
    return code, capsys.readouterr().out


def test_on_another_cpu_kind_a_run_a_fraction_of_a_seed_spread_away_reproduces(capsys):
    records = seeds()
    again = hand_made("mix-and-match-seed0", 10.3, cpu="AMD", capability="AVX2", losses=[80.2])
    code, out = verify_out(capsys, records["mix-and-match-seed0"], again, records)
    assert code == 0 and out.startswith("mix-and-match-seed0 reproduces its record up to rounding\n")
    assert "the record's Intel (AVX512, torch 2.14.1) against this AMD (AVX2, torch 2.14.1)" in out
    assert "its first 10 epochs: 0.20 seed sds from its record (root mean square; the limit 0.35" in out
    closest = out.split("the closest to their limit:\n", 1)[1].splitlines()[1:3]
    assert [line.split()[:2] for line in closest] == [["T1", "kl"], ["epoch", "1"]]  # the farthest first
    assert "every number:" in out


def test_on_another_cpu_kind_another_seeds_record_does_not(capsys):
    records = seeds()
    # seed 1's numbers under seed 0's name: each within the per-number limit, its first epochs a seed sd away
    seed1 = records["mix-and-match-seed1"]
    renamed = {**seed1, "cpu": "AMD", "run": "mix-and-match-seed0",
               "measurements": {"mix-and-match-seed0-T1": seed1["measurements"]["mix-and-match-seed1-T1"]}}
    code, out = verify_out(capsys, records["mix-and-match-seed0"], renamed, records)
    assert code == 1 and out.startswith("mix-and-match-seed0 does not reproduce its record: its training is another "
                                        "run\n")
    assert "its first 10 epochs: 1.00 seed sds" in out


def test_on_another_cpu_kind_one_measure_far_beyond_its_spread_fails_among_many_close_ones(capsys):
    records = seeds(epochs=300)
    again = hand_made("mix-and-match-seed0", 15.0, cpu="AMD", losses=[80.1] * 300)  # KL 5 seed sds away
    code, out = verify_out(capsys, records["mix-and-match-seed0"], again, records)
    assert code == 1 and out.startswith("mix-and-match-seed0 does not reproduce its record: T1 kl\n")
    assert "its first 10 epochs: 0.10 seed sds" in out and "(the limit 4.15 for 301 numbers)" in out
    again["measurements"]["mix-and-match-seed0-T1"]["metrics"]["metrics"]["kl"]["model"] = 13.0  # 3 sds: within
    assert verify_out(capsys, records["mix-and-match-seed0"], again, records)[0] == 0


def test_the_limit_of_a_number_grows_with_the_count_so_that_the_chance_of_a_false_alarm_does_not():
    for count in (21, 171, 465):
        limit = reproduce_plan.number_limit(count)
        chance = 2 * count * (1 - statistics.NormalDist().cdf(limit))  # Bonferroni: one of count numbers
        assert chance == pytest.approx(reproduce_plan.FALSE_ALARM)
    assert reproduce_plan.number_limit(21) < reproduce_plan.number_limit(465) < 4.5


def test_a_number_the_seeds_agree_on_and_an_na_one_must_agree(capsys):
    records = seeds()
    again = hand_made("mix-and-match-seed0", 10.0, cpu="AMD", units=31)
    code, out = verify_out(capsys, records["mix-and-match-seed0"], again, records)
    assert code == 1 and "does not reproduce its record: T1 active_units\n" in out
    again = hand_made("mix-and-match-seed0", 10.0, cpu="AMD")
    again["measurements"]["mix-and-match-seed0-T1"]["metrics"]["metrics"]["diversity_sampling"]["model"] = 0.5
    assert verify_out(capsys, records["mix-and-match-seed0"], again, records)[0] == 1


def test_a_run_without_seeds_of_its_own_is_judged_by_its_conditionings_and_the_same_kind_bit_for_bit(capsys):
    records = seeds()
    records["mix-and-match-alpha16"] = hand_made("mix-and-match-alpha16", 5.0)
    again = hand_made("mix-and-match-alpha16", 5.2, torch_version="2.15.0")  # another torch: not the same kind
    assert verify_out(capsys, records["mix-and-match-alpha16"], again, records)[0] == 0
    again = hand_made("mix-and-match-alpha16", 5.0 + 1e-9)  # the same kind: equal or not at all
    code, out = verify_out(capsys, records["mix-and-match-alpha16"], again, records)
    assert code == 1 and out.startswith("mix-and-match-alpha16 does not agree with its record: 1 of 4 numbers differ")
    assert "the record names no torchvision, numpy, python" in out
    # a record that names the versions: one that differs makes it another kind, judged by the spread
    named = {**records["mix-and-match-alpha16"], "numpy": "2.4.6"}
    assert verify_out(capsys, named, {**again, "numpy": "2.5.0"}, records)[0] == 0
    # with no seeds of its family recorded, no verdict can be given
    code, out = verify_out(capsys, records["mix-and-match-alpha16"], again | {"cpu": "AMD"}, {})
    assert code == 1 and "cannot be judged: the records hold no family of its decoder (mlp) with seeds 0, 1, 2" in out


def test_verify_tells_the_committed_pairs_apart():
    """The criterion on the records' pairs (the report's table): every run trained and measured
    again on another machine, and the shipped model, reproduce; every other record under their
    names, and each of them with one measure moved by hand, does not."""
    records = reproduce_plan.read_records(reproduce_plan.RECORDS)
    again = reproduce_plan.read_records(reproduce_documents.again_folder(reproduce_plan.RECORDS))
    trials = reproduce_plan.verify_trials(records, again)
    same = [verdict["agrees"] for what, _, verdict in trials if what == "the same run"]
    assert len(same) == len(again) + 1 and all(same)
    others = [(what, run) for what, run, verdict in trials if what != "the same run" and verdict["agrees"]]
    assert others == [] and len(trials) > 10 * len(same)


@pytest.mark.parametrize("content, message", [
    ("{\"run\": ", "cannot be read (JSONDecodeError)"),
    ("[]", "is not one of this reproduction's (a list, not a record)"),
    (json.dumps({**hand_made("x", 1.0), "run": "y"}), "is not one of this reproduction's (the run 'y')"),
    (json.dumps({**hand_made("x", 1.0), "measurements": {"x-T1": {"metrics": None}}}),
     "(the measurement x-T1 is not sample.py's metrics JSON)"),
    (json.dumps({**hand_made("x", 1.0), "measurements": {"x-T1": {"metrics": {"metrics": {}}}}}),  # no judge
     "(the measurement x-T1 is not sample.py's metrics JSON)"),
    # a number that is not a number, and a field the tables read that is missing (issue 33's battery)
    (json.dumps(hand_made("x", "10.4")), "(the measurement x-T1 has a measure that is not a number, or no "),
    (json.dumps(hand_made("x", float("nan"))), "cannot be read (NaN where a number should be)"),
    (json.dumps(hand_made("x", 1.0)).replace('"flags": [], "seconds": 1.0, "metrics"', '"flags": [], "metrics"'),
     "(the measurement x-T1 has no flags or seconds)"),
    (json.dumps({**hand_made("x", 1.0), "history": [{"epoch": 1, "test_loss": "80"}]}),
     "(a history whose epochs are not numbers, each with its epoch and seconds)"),
    (json.dumps({**hand_made("x", 1.0), "train": {"flags": [], "epochs": 50}}), "(a train field without its "),
    (json.dumps({**hand_made("x", 1.0), "threads": "1"}), "(no thread count, torch, CPU or instruction set)"),
    (json.dumps({**hand_made("x", 1.0), "measurements": []}), "(measurements that are not a table of measurements)"),
])
def test_a_broken_record_is_named_in_one_line_before_any_work(tmp_path, content, message):
    (tmp_path / "x.json").write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        reproduce_plan.read_records(str(tmp_path))
    assert f"error: the record {tmp_path / 'x.json'} " in e.value.code and message in e.value.code
    assert "restore it with git checkout, or delete it" in e.value.code


def test_the_committed_documents_are_what_the_committed_records_give(capsys):
    assert reproduce_documents.write_documents(reproduce_plan.RECORDS, check=True) == 0, capsys.readouterr().out


# a number with a decimal point, not part of a version (torch 2.14.1) or of a name
NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+)(?!\.?\w)")
PAPER_NUMBERS = {"0.08", "0.01"}  # the report quotes them from the paper (the fixed split's KLs), not from a run
PAPER_SECTION = re.compile(r"section \d+\.\d+")  # "the paper's section 3.3": a place, not a number


def test_the_prose_numbers_of_a_recorded_section_are_in_its_tables():
    """Once a section's tables are written (none pending), every number with a decimal point in its
    prose, rounded as the prose rounds it and sign aside, is a number of those tables or of the
    table files it links: no number typed by hand. A section is a "## " part of a document, or a
    "### " part of one, so that a part is checked as soon as its own tables are written."""
    for document in reproduce_documents.DOCUMENTS:
        text = reproduce_documents.read_text(os.path.join(reproduce_plan.REPO, document))
        for section in re.split(r"\n(?=## )", text):
            for part in [section, *re.split(r"\n(?=### )", section)[1:]]:
                bodies = [body for _, _, body, _ in reproduce_documents.TABLE.findall(part)]
                if not bodies or any(body.startswith("*Pending") for body in bodies):
                    continue
                linked = re.findall(r"\]\((tables/[\w.]+\.md)\)", part)
                known = NUMBER.findall(" ".join(bodies + [
                    reproduce_documents.read_text(os.path.join(reproduce_plan.REPO, os.path.dirname(document), path))
                    for path in linked]))
                prose = re.sub(r"```.*?```|`[^`]*`|\]\([^)]*\)", "", reproduce_documents.TABLE.sub("", part),
                               flags=re.DOTALL)
                prose = PAPER_SECTION.sub("", prose)
                for number in set(NUMBER.findall(prose)) - PAPER_NUMBERS:
                    decimals = len(number.split(".")[1])
                    assert any(f"{float(value):.{decimals}f}" == number for value in known), \
                        f"{document}, {part.splitlines()[0]!r}: {number} is in none of its tables"


def every_measurement(name, flags):
    """A hand-made metrics JSON with every measure of sample.py, for any measurement of the plan:
    values that vary with the seed (so every sd is defined), the fixes' sweep decided by them."""
    seed = int(name.split("seed")[1][0]) if "seed" in name else 0
    keys = [*reproduce_documents.LATENT_KEYS, "recall", "best_of_k", "mean_distance", "confident_share",
            "inception_score", "rec_bce", "mm_coverage"]
    fix = name.split("-hd")[1].split("-")[0] if "-hd" in name else "0"
    values = {key: 1.0 + seed + float(fix) for key in keys}
    values["diversity_sampling"] = values["diversity_sampling"] if "mix-and-match" in name else None
    temperature = float(flags[flags.index("--temperature") + 1]) if "--temperature" in flags else 1.0
    values["distinct_digits"] = temperature + seed / 10
    return {"temperature": temperature, "metrics": {key: {"name": key.replace("_", " "), "model": value,
                                                          "real_top": 0.5} for key, value in values.items()}}


def test_every_table_fits_its_document(tmp_path, monkeypatch):
    """README's tables have at most 8 columns, the report's at most 9 (the wide matrices are files of
    their own), once every section is recorded: here from hand-made records of the whole plan."""
    args = argparse.Namespace(runs_dir=str(tmp_path), records_dir=str(tmp_path / "records"))
    for _ in range(3):  # the fixes' sweep, then its seeds, then mix-and-match with the better fix
        planned = {m: flags for section in reproduce_plan.SECTIONS
                   for m, (_, flags) in reproduce_plan.measurements(section, args).items()}
        write_records(tmp_path / "records", {m: every_measurement(m, flags) for m, flags in planned.items()})
    records = reproduce_plan.read_records(args.records_dir)
    metrics = reproduce_plan.recorded_measurements(args.records_dir)
    with open(f"{reproduce_plan.REPO}/README.md", encoding="utf-8") as f:
        in_readme = {name for _, name, _, _ in reproduce_documents.TABLE.findall(f.read())}
    for name, (_, make) in reproduce_documents.tables(args.records_dir).items():
        widest = max((line.count(" | ") + 1 for line in make(metrics, records).splitlines() if line.startswith("| ")),
                     default=0)
        assert widest <= (8 if name in in_readme else 9), name
    assert in_readme == {"found"}

    # and --tables writes every one into the documents, and every figure, from these records alone
    for path in (tmp_path / "records").iterdir():
        record = json.loads(path.read_text(encoding="utf-8"))
        record["history"] = [{"epoch": e, "train_rec": 80.0 - e, "train_kl": 10.0, "kl_weight": 0.5,
                              "test_loss": 90.0 - e, "seconds": 1.0} for e in (1, 2)]
        path.write_text(json.dumps(record), encoding="utf-8")
    (tmp_path / "samples").mkdir()
    for document in reproduce_documents.DOCUMENTS:
        shutil.copyfile(f"{reproduce_plan.REPO}/{document}", tmp_path / document)
    monkeypatch.setattr(reproduce_documents, "DOCUMENT_ROOT", str(tmp_path))
    assert reproduce_documents.write_documents(args.records_dir) == 0
    tables = [f"samples/{name}" for name in reproduce_documents.table_files()]
    for document in [*reproduce_documents.DOCUMENTS, *tables]:
        assert "Pending" not in (tmp_path / document).read_text(encoding="utf-8"), document
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == sorted(reproduce_documents.figures())


@pytest.mark.parametrize("jobs", [2, 5])  # 5: more workers than chains, which simply works
def test_two_workers_share_the_chains_and_a_continuation_follows_its_run(tiny, tmp_path, monkeypatch, capsys, jobs):
    """--jobs 2 with a stand-in for train.py and sample.py that writes what they would: each chain
    once, the continued run by the worker that trained the run it continues, right after it."""
    events = []

    def stand_in(args, what, log, script, *script_args):
        flags = list(script_args)
        if "--checkpoint-dir" in flags:  # train.py: a checkpoint at --epochs, its history continued
            folder, epochs = flags[flags.index("--checkpoint-dir") + 1], int(flags[flags.index("--epochs") + 1])
            before = torch.load(flags[flags.index("--resume") + 1])["history"] if "--resume" in flags else []
            history = before + [{"epoch": e, "seconds": 0.01} for e in range(len(before) + 1, epochs + 1)]
            os.makedirs(folder, exist_ok=True)
            torch.save({"history": history, "config": {"decoder": "mlp"}}, f"{folder}/mix_match_{epochs:02d}.pth")
        else:  # sample.py --metrics --json PATH
            os.makedirs(os.path.dirname(log), exist_ok=True)
            with open(flags[flags.index("--json") + 1], "w", encoding="utf-8") as f:
                json.dump({"classifier_accuracy": 0.9913, "temperature": 1.0, "metrics": {}}, f)
        events.append((threading.current_thread().name, what))
        time.sleep(0.1)  # so that both workers are busy at once
        return 0.01
    monkeypatch.setattr(reproduce_runs, "run", stand_in)
    monkeypatch.setattr(reproduce_results, "PLAN_AGAIN_SECONDS", 0.05)
    assert tiny("--jobs", str(jobs)) in (None, 0)
    assert "3/3 runs recorded" in capsys.readouterr().out
    trained = [(worker, what) for worker, what in events if what.startswith("training")]
    assert sorted(what.split(",")[0] for _, what in trained) == sorted(f"training {run}" for run in TINY)  # once each
    assert len({worker for worker, _ in events}) == 2
    first = next(worker for worker, what in trained if what == "training tiny-seed0")
    chain = [what for worker, what in events if worker == first]
    assert chain.index("training tiny-seed0") < chain.index("measuring tiny-seed0-T1") < next(
        i for i, what in enumerate(chain) if what.startswith("training tiny-seed0-long"))
    assert read(tmp_path, "tiny-seed0-long")["train"]["first_epoch"] == 2


# ------------------------------------------------------------------- records read strictly, documents all or nothing

def test_a_number_too_large_for_a_float_is_refused_by_name(command, documents, tmp_path):
    records, before = records_copy(tmp_path), documents()
    path = records / "concat-seed1.json"
    path.write_text(path.read_text(encoding="utf-8").replace('"test_loss": ', '"test_loss": 1e999, "x": ', 1),
                    encoding="utf-8")  # JSON reads 1e999 as infinity
    refused(command("--tables", "--records-dir", records), f"the record {path} cannot be read (1e999 where a finite "
            "number should be)")
    assert documents() == before


def test_records_that_continue_each_other_in_a_loop_are_refused_not_followed(command, documents, tmp_path):
    records, before = records_copy(tmp_path), documents()
    edit_record(records, "ar-concat-seed0", lambda r: r["train"].update(continues="ar-concat-seed0-long"))
    for flags in (["--tables"], ["--verify", "ar-concat-seed0-long"]):
        refused(command(*flags, "--records-dir", records), "continue each other in a loop (ar-concat-seed0 continues "
                "ar-concat-seed0-long continues ar-concat-seed0)")
    assert documents() == before


def test_a_record_copied_under_another_runs_name_is_not_verified_as_that_run(command, tmp_path):
    records = records_copy(tmp_path)
    edit_record(records, "fixed-seed1", lambda r: r["train"].update(flags=["--seed", "1"]))  # mix-and-match-seed1's
    result = command("--verify", "fixed-seed1", "--records-dir", records, "--runs-dir", tmp_path / "runs")
    refused(result, "the record of fixed-seed1 is not of the run the plan gives that name: trained as (flags, "
            "epochs, the run it continues) (--seed 1, 50, None) where the plan gives (--conditioning fixed --seed 1, "
            "50, None)")
    assert not (tmp_path / "runs").exists()  # nothing trained


@pytest.mark.parametrize("target", ["samples/tables/seed_differences.md", "samples/tables"])
def test_a_folder_or_file_where_a_table_belongs_leaves_every_document_as_it_was(command, documents, tmp_path, target):
    records, readme = records_copy(tmp_path), tmp_path / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8").replace("<!-- /table -->", "stale\n<!-- /table -->", 1),
                      encoding="utf-8")  # a table the command would rewrite
    shutil.rmtree(tmp_path / target) if (tmp_path / target).is_dir() else (tmp_path / target).unlink()
    (tmp_path / target).mkdir() if target.endswith(".md") else (tmp_path / target).write_text("", encoding="utf-8")
    before = documents()
    refused(command("--tables", "--records-dir", records), f"{tmp_path / target}", "a folder stands where a file "
            "belongs, or a file where a folder belongs")
    assert documents() == before and not list(tmp_path.rglob("*.tmp"))  # README and the report not rewritten


def test_a_reproduction_killed_with_sigterm_ends_its_training_too_leaving_whole_checkpoints(tmp_path, mnist_root):
    runs, records = tmp_path / "runs", tmp_path / "records"
    records.mkdir()
    process = subprocess.Popen([sys.executable, os.path.join(reproduce_plan.REPO, "tests", "reproduce_results.py"),
                                "--data-root", mnist_root, "--runs-dir", runs, "--records-dir", records, "--section",
                                "results", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    deadline = time.time() + 120
    while not list(runs.glob("*/checkpoint/mix_match_01.pth")) and time.time() < deadline:  # train.py is training
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # `kill`: this command alone gets it, not its process group
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143 and err.startswith("interrupted: the runs and measurements finished so far"), err
    assert len(err.strip().splitlines()) == 1, err  # the scripts' own lines are in their logs
    assert processes_naming(runs) == []  # no train.py trains on
    for path in runs.glob("*/checkpoint/mix_match_*.pth"):
        torch.load(path, weights_only=True)  # each whole


def processes_naming(folder):
    """The ids of this machine's processes whose command line names `folder`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):  # ended while listed
            if str(folder).encode() in pathlib.Path("/proc", pid, "cmdline").read_bytes():
                found.append(pid)
    return found


@pytest.mark.parametrize("change, message", [
    (lambda r: r["measurements"]["fixed-seed1-T1"]["metrics"]["metrics"]["kl"].update(model="11.4"),
     "(the measurement fixed-seed1-T1 has a measure that is not a number, or no temperature)"),
    (lambda r: r["measurements"]["fixed-seed1-T1"]["metrics"]["metrics"]["kl"].update(model=float("nan")),
     "cannot be read (NaN where a number should be)"),
    (lambda r: r["measurements"]["fixed-seed1-T1"].pop("seconds"), "(the measurement fixed-seed1-T1 has no flags or "),
])
def test_a_record_whose_numbers_are_not_numbers_or_that_lacks_a_field_stops_the_tables(
        command, documents, tmp_path, change, message):
    records, before = records_copy(tmp_path), documents()
    edit_record(records, "fixed-seed1", change)
    refused(command("--tables", "--records-dir", records), f"the record {records / 'fixed-seed1.json'}", message,
            "restore it with git checkout")
    assert documents() == before

def test_a_table_marker_without_its_closing_line_stops_the_tables_before_writing(command, documents, tmp_path):
    report = tmp_path / "samples" / "README.md"
    lines = report.read_text(encoding="utf-8").splitlines(keepends=True)
    closing = [i for i, line in enumerate(lines) if line == "<!-- /table -->\n"]
    del lines[closing[2]]  # the third table's closing line
    report.write_text("".join(lines), encoding="utf-8")
    before = documents()
    opening = [i for i, line in enumerate(lines) if line.startswith("<!-- table ")][2] + 1
    refused(command("--tables"), f"samples/README.md, line {opening}: a table marker without its pair",
            "restore the marker, or git checkout samples/README.md")
    assert documents() == before

def test_a_records_folder_that_does_not_exist_is_named_not_taken_for_no_records(command, documents, tmp_path):
    before = documents()
    for flags in (["--tables"], ["--tables", "--check"], ["--verify", "fixed-seed1"], []):
        refused(command(*flags, "--records-dir", tmp_path / "recrods"), f"--records-dir {tmp_path / 'recrods'}: "
                "no such folder", "create it first")
    assert documents() == before and not (tmp_path / "recrods").exists()

def test_a_records_folder_that_is_a_file_is_named(command, tmp_path):
    (tmp_path / "records").write_text("not a folder", encoding="utf-8")
    refused(command("--tables", "--records-dir", tmp_path / "records"), "no such folder")

def test_a_json_file_that_is_not_a_record_in_the_records_folder_is_named(command, documents, tmp_path):
    records, before = records_copy(tmp_path), documents()
    (records / "notes.json").write_text(json.dumps({"todo": "more seeds"}), encoding="utf-8")
    refused(command("--tables", "--records-dir", records), f"the record {records / 'notes.json'} is not one of this "
            "reproduction's (no run, train, config")
    assert documents() == before

def test_a_record_without_a_measure_its_table_reads_stops_the_tables(command, documents, tmp_path):
    records, before = records_copy(tmp_path), documents()
    edit_record(records, "concat-seed1", lambda r: r["measurements"]["concat-seed1-T1"]["metrics"]["metrics"].pop(
        "frechet"))
    refused(command("--tables", "--records-dir", records), "reads 'frechet' where the records in", "git checkout")
    assert documents() == before

def test_a_broken_run_verified_again_is_named_by_the_tables(command, documents, tmp_path):
    records, before = records_copy(tmp_path), documents()
    again = tmp_path / "r" / "verify" / "shipped.json"
    again.write_text(again.read_text(encoding="utf-8")[:300], encoding="utf-8")
    refused(command("--tables", "--records-dir", records), f"the record {again} cannot be read (JSONDecodeError)")
    assert documents() == before

@pytest.mark.parametrize("edit, line", [
    (lambda text: text.replace("<!-- table found -->\n", "", 1), "closing"),  # a closing line with no opening one
    (lambda text: text.replace("<!-- /table -->\n", "<!-- /table -->\n<!-- table found -->\n", 1), "opening"),
])
def test_a_stray_or_doubled_table_marker_stops_the_tables(command, documents, tmp_path, edit, line):
    readme = tmp_path / "README.md"
    readme.write_text(edit(readme.read_text(encoding="utf-8")), encoding="utf-8")
    before = documents()
    refused(command("--tables"), "README.md, line ", "a table marker without its pair")
    assert documents() == before

def test_a_missing_document_is_named_with_what_to_do(command, documents, tmp_path):
    (tmp_path / "samples" / "README.md").unlink()
    before = documents()
    refused(command("--tables"), "samples/README.md is missing: restore it with git checkout samples/README.md")
    assert documents() == before


def test_verify_of_a_continuation_whose_start_has_no_record_names_it(command, tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    start, long = seeds()["mix-and-match-seed0"], hand_made("mix-and-match-seed0-long", 9.0)
    long["train"] = {"script": ["train.py"], "flags": [], "epochs": 200, "continues": "mix-and-match-seed0",
                     "first_epoch": 51, "seconds": 1.0}
    for record in (start, long):
        (records / f"{record['run']}.json").write_text(json.dumps(record), encoding="utf-8")
    (records / "mix-and-match-seed0.json").unlink()
    refused(command("--verify", "mix-and-match-seed0-long", "--records-dir", records, "--runs-dir", tmp_path / "runs"),
            "mix-and-match-seed0-long continues mix-and-match-seed0, which has no record",
            "restore mix-and-match-seed0.json with git checkout")
    assert not (tmp_path / "runs").exists()
