"""Bad input, second round: files that are whole but wrong, paths, files from elsewhere, numbers at
and past their limits, interrupts and a full disk during every kind of output. Each case runs a
script as a user does, in this process (conftest's in_process: a subprocess per case would cost
the suite a torch import each): it ends in one message and an exit code, never another
exception, and leaves every file whole; or, where the input is odd but valid, it simply works."""
import os
import shutil
import struct

import numpy as np
import pytest
import torch

from conftest import N_TEST, N_TRAIN, refused
from test_faults import failing_open

METRICS = ["--metrics", "--n-eval", 40, "--n-samples", 3, "--n-importance", 2]


# ----------------------------------------------------------------------------- whole but wrong: checkpoints

def broken_copy(path, where, key, value=float("nan")):
    checkpoint = torch.load(path, weights_only=True)
    tensor = checkpoint[where][key] if where == "model" else checkpoint["optimizer"]["state"][0][key]
    tensor.view(-1)[3] = value
    torch.save(checkpoint, path.parent / f"broken_{key}.pth")
    return path.parent / f"broken_{key}.pth"


def test_a_checkpoint_holding_a_nan_or_inf_is_refused_by_name_everywhere(user, trained, tmp_path):
    nan_decoder = broken_copy(trained, "model", "data_decoder.3.weight")
    inf_encoder = broken_copy(trained, "model", "data_encoder.0.weight", float("inf"))
    nan_moment = broken_copy(trained, "optimizer", "exp_avg")
    # before: a blank grid and exit 0; a traceback in --metrics; a resumed epoch, then "diverged"
    refused(user("sample.py", "--checkpoint", nan_decoder, "--out", "g.png"),
            "holds a NaN or infinite value in model.data_decoder.3.weight: it was saved broken")
    refused(user("sample.py", "--checkpoint", inf_encoder, "--out", "g.png", *METRICS),
            "holds a NaN or infinite value in model.data_encoder.0.weight")
    for broken, name in [(nan_decoder, "model.data_decoder.3.weight"), (nan_moment, "optimizer.state.0.exp_avg")]:
        refused(user("train.py", "--resume", broken, "--epochs", 2, "--checkpoint-dir", "ck2", "--results-dir", "r2"),
                f"holds a NaN or infinite value in {name}")
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "ck2").exists()


def test_a_cached_classifier_holding_a_nan_is_retrained(user, trained, tmp_path):
    user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS, check=True)
    cache = tmp_path / "checkpoint" / "digit_classifier.pth"
    cached = torch.load(cache, weights_only=True)
    cached["model"]["1.weight"].view(-1)[0] = float("nan")
    torch.save(cached, cache)
    _, out, _ = user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS, check=True)
    assert "retraining the digit classifier" in out and "holds a NaN or infinite value" in out


@pytest.mark.parametrize("what, make, message", [
    ("an empty file", lambda p: p.write_bytes(b""), "it is truncated or not a checkpoint of this repository"),
    ("a JSON file", lambda p: p.write_text('{"alpha": 64}', encoding="utf-8"), "it is truncated or not a checkpoint"),
    ("a PNG image", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)), "it is truncated or not a checkpoint"),
    ("another model's weights", lambda p: torch.save(torch.nn.Linear(3, 4).state_dict(), p),
     ("does not match MixAndMatchCVAE (a bare state_dict, read with the tutorial's sizes): Missing key(s) in "
     "state_dict: data_encoder.0.weight, data_encoder.0.bias, data_encoder.1.weight and 35 more")),
    ("a list", lambda p: torch.save([1, 2], p), "holds a list, not a checkpoint"),
])
def test_files_from_elsewhere_passed_as_a_checkpoint(user, tmp_path, what, make, message):
    make(tmp_path / "given.pth")
    refused(user("sample.py", "--checkpoint", "given.pth", "--out", "g.png"), message)


def test_checkpoints_of_another_version_of_this_repository(user, trained, tmp_path):
    for edit, script, message in [
            (lambda c: c.pop("alpha"), "sample.py", "holds model weights but no alpha: it was not written by"),
            (lambda c: c["config"].update(dropout=0.1), "sample.py", "unexpected keyword argument 'dropout'"),
            (lambda c: c.pop("rng"), "train.py", "has no rng: it was written by another program or edited")]:
        checkpoint = torch.load(trained, weights_only=True)
        edit(checkpoint)
        torch.save(checkpoint, tmp_path / "other.pth")
        flags = ["--out", "g.png"] if script == "sample.py" else ["--epochs", 2, "--checkpoint-dir", "ck2"]
        refused(user(script, "--checkpoint" if script == "sample.py" else "--resume", "other.pth", *flags), message)


def test_an_unreadable_checkpoint_says_so(user, trained, monkeypatch):
    # as root every file is readable, so the permission error torch.load would meet is made here
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(torch, "load", denied)
    refused(user("sample.py", "--checkpoint", trained, "--out", "g.png"), "cannot read checkpoint")
    refused(user("sample.py", "--checkpoint", trained, "--out", "g.png"), ": Permission denied")


# ----------------------------------------------------------------------------- whole but wrong: MNIST

def raw(tmp_path, name):
    return tmp_path / "data" / "MNIST" / "raw" / name


def write_array(path, magic, array):
    path.write_bytes(struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("case", ["test labels over training labels", "labels file as images", "32 x 32 images",
                                  "labels of 3 dimensions", "a label 12"])
def test_whole_mnist_files_that_do_not_belong_together(user, trained, tmp_path, case):
    if case == "test labels over training labels":  # before: an IndexError inside the classifier's training
        shutil.copy(raw(tmp_path, "t10k-labels-idx1-ubyte"), raw(tmp_path, "train-labels-idx1-ubyte"))
        message = (f"train-images-idx3-ubyte ({N_TRAIN} images) and data/MNIST/raw/train-labels-idx1-ubyte "
                   f"({N_TEST} labels) do not belong together")
    elif case == "labels file as images":  # before: torchvision's ValueError
        shutil.copy(raw(tmp_path, "train-labels-idx1-ubyte"), raw(tmp_path, "t10k-images-idx3-ubyte"))
        message = f"t10k-images-idx3-ubyte holds an array of shape ({N_TRAIN},), where 28 x 28 images belong"
    elif case == "32 x 32 images":  # before: the model's ValueError on the condition's width
        write_array(raw(tmp_path, "t10k-images-idx3-ubyte"), 2051, np.zeros((N_TEST, 32, 32)))
        message = f"holds an array of shape ({N_TEST}, 32, 32), where 28 x 28 images belong"
    elif case == "labels of 3 dimensions":
        write_array(raw(tmp_path, "train-labels-idx1-ubyte"), 2051, np.zeros((N_TRAIN, 1, 1)))  # 0x803: 3 dims
        message = "where labels (one dimension) belong"
    else:  # before: a silently wrong classifier accuracy
        labels = np.zeros(N_TEST)
        labels[5] = 12
        write_array(raw(tmp_path, "t10k-labels-idx1-ubyte"), 2049, labels)
        message = "t10k-labels-idx1-ubyte holds the label 12 (image 5), where digits 0 to 9 belong"
    refused(user("train.py", "--epochs", 1, "--checkpoint-dir", "ck2", "--results-dir", "r2"), message)
    refused(user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS), message)
    assert not list(tmp_path.glob("ck2/*"))  # the folder was made when checked, before the data; nothing in it


# ----------------------------------------------------------------------------- paths

def test_a_folder_where_a_file_belongs_and_a_file_where_a_folder_belongs(user, trained, tmp_path):
    (tmp_path / "grid.png").mkdir()
    (tmp_path / "m.json").mkdir()
    refused(user("sample.py", "--checkpoint", "ck", "--out", "g.png"), "checkpoint 'ck' is a folder; pass one of its")
    refused(user("train.py", "--resume", "ck", "--epochs", 2), "checkpoint 'ck' is a folder")
    refused(user("sample.py", "--checkpoint", trained, "--out", "grid.png"), "--out 'grid.png' is a folder")
    refused(user("sample.py", "--checkpoint", trained, "--out", "g.png", "--figure", "grid.png"),
            "--figure 'grid.png' is a folder")
    refused(user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS, "--json", "m.json"),
            "--json 'm.json' is a folder; pass a file name, e.g. m.json/out.json")
    refused(user("train.py", data=str(trained)), "--data-root '" + str(trained) + "' is a file; pass the folder")
    assert not (tmp_path / "g.png").exists()  # each refused before any work


def test_names_with_spaces_and_non_ascii_work(user, tmp_path, mnist_root):
    shutil.copytree(tmp_path / "data", tmp_path / "my data é")
    user("train.py", "--epochs", 1, "--checkpoint-dir", "my run/ck ü", "--results-dir", "my run/résultats",
         data="my data é", check=True)
    user("sample.py", "--checkpoint", "my run/ck ü/mix_match_01.pth", "--out", "sortie é/grid 1.png",
         data="my data é", check=True)
    assert (tmp_path / "sortie é" / "grid 1.png").is_file()
    # the message that continues an interrupted run quotes the paths for a shell
    code, _, err = user("train.py", "--epochs", 3, "--resume", "my run/ck ü/mix_match_01.pth", "--checkpoint-dir",
                        "my run/ck ü", "--results-dir", "my run/résultats", "--lr", 1e6, data="my data é")
    assert code == 1 and "python3 train.py --resume 'my run/ck ü/mix_match_01.pth'" in err
    assert "--data-root 'my data é'" in err


# ----------------------------------------------------------------------------- numbers at and past their limits

@pytest.mark.parametrize("script, flag", [("train.py", f) for f in ("--epochs", "--batch-size", "--hidden-dim",
                                                                    "--latent-dim")]
                         + [("sample.py", f) for f in ("--n-images", "--n-samples", "--n-eval", "--n-importance")])
def test_every_count_flag_at_zero_is_refused(user, script, flag):
    refused(user(script, flag, 0), f"argument {flag}: expected a whole number >= 1, got '0'", code=2)


@pytest.mark.parametrize("value", ["-1", "4294967296", "99999999999999999999999"])
def test_a_seed_outside_what_every_generator_takes_is_refused(user, value):
    for script in ("train.py", "sample.py"):  # before: numpy's ValueError traceback
        refused(user(script, "--seed", value), "argument --seed: expected a whole number from 0 to 4294967295",
                code=2)


def test_far_too_large_numbers(user, trained, tmp_path):
    for flag in ("--hidden-dim", "--latent-dim"):  # before: torch's allocator error
        refused(user("train.py", flag, 10 ** 9, "--alpha", 1, "--epochs", 1, "--checkpoint-dir", "ck2"),
                "does not fit in memory (RuntimeError while allocating its weights); use smaller sizes")
    refused(user("sample.py", "--checkpoint", trained, "--n-images", 10 ** 9), f"--n-images must be at most {N_TEST}",
            code=2)
    refused(user("sample.py", "--checkpoint", trained, *METRICS[:1], "--n-eval", N_TEST),
            f"--n-eval must be at most {N_TEST - 6}: the fidelity measures compare", code=2)
    # before: a grid of noise and exit 0, or eigh's error in the metrics
    refused(user("sample.py", "--checkpoint", trained, "--out", "g.png", "--temperature", "1e38", *METRICS),
            "the completions are not finite numbers at --temperature 1e+38; use a lower one")
    assert not (tmp_path / "g.png").exists() and not list(tmp_path.glob("ck2/*"))


def test_odd_but_valid_numbers_simply_work(user, tmp_path):
    for flags in (["--hidden-dim", 2, "--latent-dim", 1, "--alpha", 1], ["--alpha", 0], ["--alpha", 128],
                  ["--batch-size", 10 ** 9], ["--curriculum-step", 10 ** 9]):
        user("train.py", "--epochs", 1, "--checkpoint-dir", "ck", "--results-dir", "res", *flags, check=True)
        user("sample.py", "--checkpoint", "ck/mix_match_01.pth", "--out", "g.png", "--n-samples", 2, *METRICS[:1],
             "--n-eval", 20, "--n-importance", 2, check=True)
    assert torch.load(tmp_path / "ck" / "mix_match_01.pth", weights_only=True)["args"]["curriculum_step"] == 10 ** 9
    user("sample.py", "--checkpoint", "ck/mix_match_01.pth", "--out", "g.png", "--n-samples", 1, "--alpha", 0,
         check=True)  # one completion, no metrics


# ----------------------------------------------------------------------------- a full disk and Ctrl-C, every output

@pytest.mark.parametrize("output, flags", [
    ("g.png", []), ("fig.png", ["--figure", "fig.png"]), ("m.json", [*METRICS, "--json", "m.json"]),
    ("digit_classifier.pth", METRICS), ("mnist_neighbours.pth", METRICS)])
def test_sample_py_on_a_full_disk_writes_no_half_file(user, trained, tmp_path, monkeypatch, output, flags):
    monkeypatch.setattr("utils.open", failing_open(lambda p: p.endswith(output + ".tmp"), after_bytes=10),
                        raising=False)
    refused(user("sample.py", "--checkpoint", trained, "--out", "g.png", *flags),
            f"{output}: the disk is full (No space left on device): free space, then run the command again; the "
            f"files written before it are whole.")
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    assert not [p for p in written if p.endswith((".tmp", output))], written


@pytest.mark.parametrize("output, epochs, message", [
    ("args.json", 2, "No checkpoint of this run is on disk yet; start it again."),
    ("rec_01.png", 2, "No checkpoint of this run is on disk yet; start it again."),
    ("history.json", 2, "The last complete checkpoint is ck/mix_match_01.pth; continue with"),
    # after the last epoch: its checkpoint is whole, and --resume would have nothing left to train
    ("curves.png", 1, ("Training is complete: ck/mix_match_01.pth holds the last epoch, whole; only "
                      "res/curves.png is missing.")),
])
def test_train_py_on_a_full_disk_during_each_output(user, tmp_path, monkeypatch, output, epochs, message):
    monkeypatch.setattr("utils.open", failing_open(lambda p: p.endswith(output + ".tmp"), after_bytes=10),
                        raising=False)
    refused(user("train.py", "--epochs", epochs, "--checkpoint-dir", "ck", "--results-dir", "res"),
            f"error: res/{output}: the disk is full (No space left on device): free space. {message}")
    assert not list(tmp_path.glob("*/*.tmp"))


@pytest.mark.parametrize("step", ["random_shift", "bottom_neighbours", "posterior_draws", "plot_sampling_resampling"])
def test_ctrl_c_in_each_step_of_sample_py_leaves_every_file_whole(user, trained, tmp_path, monkeypatch, step):
    # the classifier's training, the neighbours' search, the metrics, the figure
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(f"utils.{step}", interrupted)
    refused(user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS, "--json", "m.json",
                 "--figure", "fig.png"), "interrupted: the files written so far are whole", code=130)
    for cache in (tmp_path / "checkpoint").glob("*"):
        torch.load(cache, weights_only=True)  # whole, if written at all
    assert not (tmp_path / "m.json").exists() and not list(tmp_path.glob("**/*.tmp"))
    assert (tmp_path / "g.png").is_file()  # the grid came first, whole
