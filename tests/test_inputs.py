"""The tutorial's scripts on input a user gets wrong, run as a user runs them (conftest's
in_process, which gives the exit code and output a subprocess would): checkpoints and caches whole
but wrong or of another version, MNIST files that are broken or do not belong together, paths,
devices, and flags and numbers at and past their limits. Each ends in one message that says what
to do and an exit code, never another exception; or, where the input is odd but valid, it simply
works."""
import gzip
import json
import os
import re
import shutil
import struct

import numpy as np
import pytest
import torch

from conftest import METRICS, N_TEST, N_TRAIN, checkpoints_on_disk, refused
from model import MixAndMatchCVAE
from utils import (
    MNIST_FILES,
    get_device,
)


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
            (lambda c: c.pop("config"), "sample.py", "has no config: it was not written by this version of"),
            (lambda c: c["config"].pop("seed"), "train.py", "holds settings train.py refuses (settings ['seed']"),
            (lambda c: c["config"].update(dropout=0.1), "sample.py", "settings ['dropout'] are not this version's"),
            (lambda c: c["config"].update(decoder="rnn"), "sample.py", "--decoder must be one of mlp, autoregressive"),
            (lambda c: c["config"].update(history_dropout=0.5), "train.py", "--history-dropout must be in [0, 1), and "
                                                                              "0 unless --decoder autoregressive"),
            (lambda c: c["config"].update(hidden_dim="128"), "sample.py", "--hidden-dim must be a whole number >= 1"),
            (lambda c: c["config"].update(alpha=500), "sample.py", "--alpha must be in 0..128"),
            (lambda c: c.update(config=[1]), "train.py", "settings not a dict are not this version's"),
            (lambda c: c.pop("rng"), "train.py", "has no rng: it was not written by this version of train.py, which "
                                                 "--resume needs")]:
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

def raw(tmp_path, name):
    return tmp_path / "data" / "MNIST" / "raw" / name

def write_array(path, magic, array):
    path.write_bytes(struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes())

@pytest.mark.parametrize("case", ["test labels over training labels", "labels file as images", "32 x 32 images",
                                  "labels of 3 dimensions", "a label 12"])
def test_whole_mnist_files_that_do_not_belong_together(user, trained, tmp_path, case):
    if case == "test labels over training labels":
        shutil.copy(raw(tmp_path, "t10k-labels-idx1-ubyte"), raw(tmp_path, "train-labels-idx1-ubyte"))
        message = (f"train-images-idx3-ubyte ({N_TRAIN} images) and data/MNIST/raw/train-labels-idx1-ubyte "
                   f"({N_TEST} labels) do not belong together")
    elif case == "labels file as images":
        shutil.copy(raw(tmp_path, "train-labels-idx1-ubyte"), raw(tmp_path, "t10k-images-idx3-ubyte"))
        message = f"t10k-images-idx3-ubyte holds an array of shape ({N_TRAIN},), where 28 x 28 images belong"
    elif case == "32 x 32 images":
        write_array(raw(tmp_path, "t10k-images-idx3-ubyte"), 2051, np.zeros((N_TEST, 32, 32)))
        message = f"holds an array of shape ({N_TEST}, 32, 32), where 28 x 28 images belong"
    elif case == "labels of 3 dimensions":
        write_array(raw(tmp_path, "train-labels-idx1-ubyte"), 2051, np.zeros((N_TRAIN, 1, 1)))  # 0x803: 3 dims
        message = "where labels (one dimension) belong"
    else:
        labels = np.zeros(N_TEST)
        labels[5] = 12
        write_array(raw(tmp_path, "t10k-labels-idx1-ubyte"), 2049, labels)
        message = "t10k-labels-idx1-ubyte holds the label 12 (image 5), where digits 0 to 9 belong"
    refused(user("train.py", "--epochs", 1, "--checkpoint-dir", "ck2", "--results-dir", "r2"), message)
    refused(user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS), message)
    assert not list(tmp_path.glob("ck2/*"))  # the folder was made when checked, before the data; nothing in it

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

@pytest.mark.parametrize("script, flag", [("train.py", f) for f in ("--epochs", "--batch-size", "--hidden-dim",
                                                                    "--latent-dim")]
                         + [("sample.py", f) for f in ("--n-images", "--n-samples", "--n-eval", "--n-importance")])
def test_every_count_flag_at_zero_is_refused(user, script, flag):
    # train.py's settings check themselves (model.Config.check): --batch-size says why it needs 2
    messages = [f"argument {flag}: expected a whole number >= 1, got '0'"] if script == "sample.py" else \
        [f"{flag} must be", "got 0"]
    refused(user(script, flag, 0), *messages, code=2)

@pytest.mark.parametrize("value", ["-1", "4294967296", "99999999999999999999999"])
def test_a_seed_outside_what_every_generator_takes_is_refused(user, value):
    for script in ("train.py", "sample.py"):
        refused(user(script, "--seed", value), "--seed", "a whole number from 0 to 4294967295", code=2)

def test_far_too_large_numbers(user, trained, tmp_path):
    for flag in ("--hidden-dim", "--latent-dim"):
        refused(user("train.py", flag, 10 ** 9, "--alpha", 1, "--epochs", 1, "--checkpoint-dir", "ck2"),
                "does not fit in memory (RuntimeError while allocating its weights); use smaller sizes")
    refused(user("sample.py", "--checkpoint", trained, "--n-images", 10 ** 9), f"--n-images must be at most {N_TEST}",
            code=2)
    refused(user("sample.py", "--checkpoint", trained, *METRICS[:1], "--n-eval", N_TEST),
            f"--n-eval must be at most {N_TEST - 6}: the fidelity measures compare", code=2)
    refused(user("sample.py", "--checkpoint", trained, "--out", "g.png", "--temperature", "1e38", *METRICS),
            "the completions are not finite numbers at --temperature 1e+38; use a lower one")
    assert not (tmp_path / "g.png").exists() and not list(tmp_path.glob("ck2/*"))

def test_odd_but_valid_numbers_simply_work(user, tmp_path):
    for flags in (["--hidden-dim", 2, "--latent-dim", 1, "--alpha", 1], ["--alpha", 0], ["--alpha", 128],
                  ["--batch-size", 10 ** 9], ["--curriculum-step", 10 ** 9]):
        user("train.py", "--epochs", 1, "--checkpoint-dir", "ck", "--results-dir", "res", *flags, check=True)
        user("sample.py", "--checkpoint", "ck/mix_match_01.pth", "--out", "g.png", "--n-samples", 2, *METRICS[:1],
             "--n-eval", 20, "--n-importance", 2, check=True)
    assert torch.load(tmp_path / "ck" / "mix_match_01.pth", weights_only=True)["config"]["curriculum_step"] == 10 ** 9
    user("sample.py", "--checkpoint", "ck/mix_match_01.pth", "--out", "g.png", "--n-samples", 1, "--alpha", 0,
         check=True)  # one completion, no metrics

def strict_json(path):
    """The file as JSON, refusing NaN and infinities as strict parsers do."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)

def test_caches_an_older_version_wrote_are_rebuilt_with_a_line(user, trained, tmp_path):
    user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS, check=True)
    classifier = tmp_path / "checkpoint" / "digit_classifier.pth"
    neighbours = tmp_path / "checkpoint" / "mnist_neighbours.pth"
    cached = torch.load(classifier, weights_only=True)  # layers named otherwise, same MNIST files
    cached["model"] = {f"net.{key}": value for key, value in cached["model"].items()}
    torch.save(cached, classifier)
    cached = torch.load(neighbours, weights_only=True)  # a neighbours file without today's keys
    del cached["threshold"]
    torch.save(cached, neighbours)
    code, out, err = user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS, "--json", "m.json")
    assert code == 0, err
    assert ("retraining the digit classifier: checkpoint/digit_classifier.pth does not fit this version of the code "
            "(RuntimeError") in out
    assert ("finding the bottom neighbours again: checkpoint/mnist_neighbours.pth does not fit this version of the "
            "code (KeyError: 'threshold')") in out
    assert "threshold" in torch.load(neighbours, weights_only=True)  # rebuilt whole
    _, out, _ = user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS, check=True)
    assert "retraining" not in out and "again" not in out  # and used from then on
    torch.save([1, 2], neighbours)  # not even a dict
    _, out, _ = user("sample.py", "--checkpoint", trained, "--out", "g.png", *METRICS, check=True)
    assert "finding the bottom neighbours again: checkpoint/mnist_neighbours.pth holds a list, not a cache" in out

def test_metric_flags_at_their_limits_are_refused_in_one_line_or_give_strict_json(user, trained, tmp_path):
    for n_eval in (1, 2):
        for n_samples in (1, 2, 3):
            for n_importance in (1, 2):
                flags = ["--n-eval", n_eval, "--n-samples", n_samples, "--n-importance", n_importance]
                result = user("sample.py", "--checkpoint", trained, "--out", "g.png", "--metrics", *flags,
                              "--json", "m.json")
                if n_samples < 2:
                    refused(result, "--metrics needs --n-samples >= 2", code=2)
                elif n_eval < 2:
                    refused(result, "--metrics needs --n-eval >= 2", code=2)
                elif n_eval * n_samples < 6:
                    refused(result, "--metrics needs --n-eval x --n-samples >= 6 completions", code=2)
                else:
                    assert result[0] == 0, result
                    assert strict_json(tmp_path / "m.json")["n_eval"] == n_eval
    for alpha, undefined in [(0, {"diversity_sampling"}), (128, {"diversity_sampling", "diversity_z"})]:
        code, out, err = user("sample.py", "--checkpoint", trained, "--out", "g.png", "--alpha", alpha, "--metrics",
                              "--n-eval", 3, "--n-samples", 2, "--n-importance", 1, "--json", "m.json")
        assert code == 0, err
        metrics = strict_json(tmp_path / "m.json")["metrics"]
        assert {key for key, row in metrics.items() if row["model"] is None} == undefined
        assert f"n/a: alpha {alpha}: the Sampling alone gives no diversity by construction" in out

def test_the_four_gz_files_alone_work_and_a_broken_one_is_named(user, tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    for name in MNIST_FILES:  # gzip'ed here, so not the MD5 of the original download
        (raw / f"{name}.gz").write_bytes(gzip.compress((raw / name).read_bytes()))
        (raw / name).unlink()
    code, out, err = user("train.py", "--epochs", 1, "--checkpoint-dir", "ck", "--results-dir", "res")
    assert code == 0, err
    assert f"decompressed {os.path.join('data', 'MNIST', 'raw', MNIST_FILES[0])}.gz" in out
    (raw / MNIST_FILES[2]).unlink()
    (raw / f"{MNIST_FILES[2]}.gz").write_bytes(b"not gzip")
    refused(user("train.py", "--epochs", 1, "--checkpoint-dir", "ck2", "--results-dir", "res"),
            f"{MNIST_FILES[2]}.gz is there but cannot be decompressed (BadGzipFile): replace it with an intact copy")

def test_output_folders_and_files_are_checked_before_any_work(tmp_path, in_process):
    (tmp_path / "a_file").write_text("", encoding="utf-8")
    nowhere = tmp_path / "no_data"  # had training or sampling started, this would be the error
    for flag in ["--checkpoint-dir", "--results-dir"]:
        result = in_process("train.py", "--data-root", nowhere, flag, "a_file/sub", cwd=tmp_path)
        refused(result, f"cannot write in the folder 'a_file/sub' (Not a directory); pass another {flag}")
    for args, message in [(["--out", "results/grid"], "--out 'results/grid': no extension to name its format"),
                          (["--out", "grid.xyz"], "--out 'grid.xyz': cannot write the format '.xyz'"),
                          (["--out", "a_file/grid.png"], "cannot write in the folder 'a_file'"),
                          (["--figure", "fig.bmp2"], "--figure 'fig.bmp2': cannot write the format '.bmp2'"),
                          (["--figure", "a_file/fig.png"], "cannot write in the folder 'a_file'")]:
        result = in_process("sample.py", "--data-root", nowhere, "--checkpoint", "missing.pth", *args, cwd=tmp_path)
        refused(result, message)
    assert [name for _, _, files in os.walk(tmp_path) for name in files] == ["a_file"]  # nothing was written

@pytest.mark.parametrize("device, message", [("tpu", "--device 'tpu' is not one of auto, cpu, cuda, cuda:N"),
                                             ("cuda:x", "--device 'cuda:x' is not one of"),
                                             ("meta", "--device 'meta' is not one of"),
                                             ("cuda:0", "asked for CUDA, which is not available here")])
def test_device_strings_get_one_line(device, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    with pytest.raises(SystemExit, match=re.escape(message)):
        get_device(device)

def test_scripts_refuse_a_bad_device_before_any_work(tmp_path, in_process):
    for script in ["train.py", "sample.py"]:
        refused(in_process(script, "--device", "cuda:x", cwd=tmp_path), "is not one of")

def test_resume_refuses_nothing_to_do_and_contradicting_model_flags(tmp_path, train):
    train("--epochs", "2")
    before = checkpoints_on_disk(tmp_path / "ck")
    result = train("--resume", "ck/mix_match_02.pth", "--epochs", "2", check=False)
    refused(result, "ck/mix_match_02.pth is already at epoch 2, and --epochs is 2: nothing left to train")
    contradicting = [("--alpha", 10, 64), ("--hidden-dim", 64, 128), ("--latent-dim", 8, 32),
                     ("--conditioning", "fixed", "mix-and-match"), ("--curriculum-step", 2, 0)]
    result = train("--resume", "ck/mix_match_01.pth", "--epochs", "3",
                   *[word for flag, value, _ in contradicting for word in (flag, value)], check=False)
    refused(result, "a resumed run keeps its checkpoint's model")
    for flag, value, saved in contradicting:  # each named, with the checkpoint's value
        assert f"{flag} {value} (the checkpoint has {saved})" in result.stderr
    assert checkpoints_on_disk(tmp_path / "ck") == before

    # what may change on resume does: --lr, --epochs, the folders; a model flag that agrees is accepted
    train("--resume", "ck/mix_match_01.pth", "--epochs", "2", "--lr", "3e-4",
          "--alpha", "64", "--checkpoint-dir", "ck2")
    resumed = torch.load(tmp_path / "ck2" / "mix_match_02.pth", weights_only=True)
    assert resumed["optimizer"]["param_groups"][0]["lr"] == 3e-4 and resumed["config"]["lr"] == 3e-4

def test_a_truncated_mnist_file_is_named_not_called_missing(tmp_path, mnist_root, in_process):
    root = tmp_path / "data"
    shutil.copytree(mnist_root, root)
    images = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    torch.save(MixAndMatchCVAE().state_dict(), tmp_path / "tutorial.pth")  # sample.py reads a checkpoint first
    for script, extra in [("train.py", []), ("sample.py", ["--checkpoint", "tutorial.pth"])]:
        result = in_process(script, "--data-root", root, "--device", "cpu", *extra, cwd=tmp_path)
        refused(result, f"the MNIST file {images} is there but unreadable (5000 bytes, its header says")
        assert "is not under" not in result.stderr
