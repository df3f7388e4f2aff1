"""Bad input, fourth round: around the records, the documents' table markers, the runs folder and
the reproduction's flags (tests/reproduce_results.py). Each case ends in one line that names the
file or flag and what to do, a non-zero exit, and the documents and records as they were; or,
where the input is odd but valid, it simply works."""
import json

import pytest

from conftest import edit_record, records_copy, refused
from test_bad_input_3 import read_only
from test_records import hand_made, seeds

# ----------------------------------------------------------------------------- issue 33's four categories

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
    assert documents() == before  # before: 0, the report 62 lines shorter


def test_a_records_folder_that_does_not_exist_is_named_not_taken_for_no_records(command, documents, tmp_path):
    before = documents()
    for flags in (["--tables"], ["--tables", "--check"], ["--verify", "fixed-seed1"], []):
        refused(command(*flags, "--records-dir", tmp_path / "recrods"), f"--records-dir {tmp_path / 'recrods'}: "
                "no such folder", "create it first")
    assert documents() == before and not (tmp_path / "recrods").exists()


# ----------------------------------------------------------------------------- the records

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
    assert documents() == before  # before: KeyError: 'frechet'


def test_a_broken_run_verified_again_is_named_by_the_tables(command, documents, tmp_path):
    records, before = records_copy(tmp_path), documents()
    again = tmp_path / "r" / "verify" / "shipped.json"
    again.write_text(again.read_text(encoding="utf-8")[:300], encoding="utf-8")
    refused(command("--tables", "--records-dir", records), f"the record {again} cannot be read (JSONDecodeError)")
    assert documents() == before


# ----------------------------------------------------------------------------- the documents' markers

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
    assert documents() == before  # before: a full disk's message ("free space")


# ----------------------------------------------------------------------------- the runs folder

def test_a_runs_folder_that_is_a_file_is_named_before_any_work(command, tmp_path):
    (tmp_path / "runs").write_text("", encoding="utf-8")
    refused(command("--runs-dir", tmp_path / "runs", "--section", "results"), f"--runs-dir {tmp_path / 'runs'} is a "
            "file, not a folder")  # before: "File exists. ... free space"


def test_a_runs_folder_that_cannot_be_written_is_named_before_any_work(command, tmp_path):
    (tmp_path / "runs").mkdir()
    with read_only(tmp_path / "runs"):
        refused(command("--runs-dir", tmp_path / "runs", "--section", "results"),
                f"cannot write in the folder '{tmp_path / 'runs'}'", "pass another --runs-dir")


# ----------------------------------------------------------------------------- --verify, --section, --jobs

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
    refused(command(*flags), message, code=2)  # before: one of them silently ignored


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
            "restore mix-and-match-seed0.json with git checkout")  # before: KeyError
    assert not (tmp_path / "runs").exists()

