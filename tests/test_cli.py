"""The ``cleanai`` command line, run in-process through ``cleanai.cli.main``."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cleanai
from cleanai.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_python_m_cleanai_help():
    done = subprocess.run([sys.executable, "-m", "cleanai", "--help"], capture_output=True,
                          text=True, env={"PYTHONPATH": SRC, "PATH": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "prune" in done.stdout and "inspect" in done.stdout and "report" in done.stdout


@pytest.mark.parametrize("command", [[], ["prune"], ["inspect"], ["report"]])
def test_every_command_has_help(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0 and out.startswith("usage: cleanai")


def test_prune_resnet18_then_report_then_load(capsys, tmp_path):
    pytest.importorskip("torchvision")
    out_dir = tmp_path / "r18"
    code, out, err = run(capsys, "prune", "torchvision:resnet18", "--ratio", "0.35",
                         "--input-shape", "1,3,64,64", "--no-latency", "--out", str(out_dir))
    assert code == 0, err
    assert "params" in out and "11,689,512" in out and "5,079,126" in out
    assert {"cleanai.json", "weights.pt", "report.json", "report.md"} <= {p.name for p in out_dir.iterdir()}
    report = json.loads((out_dir / "report.json").read_text())
    assert report["after"]["params"] == 5_079_126

    code, out2, _ = run(capsys, "report", str(out_dir))
    assert code == 0 and "11,689,512" in out2 and "5,079,126" in out2
    code, md, _ = run(capsys, "report", str(out_dir), "--markdown")
    assert code == 0 and md.startswith("## ResNet")

    # the directory is a model: it can be loaded in Python and pruned again from the shell
    import torchvision
    model = cleanai.load_pruned(torchvision.models.resnet18(), out_dir)
    assert cleanai.utils.count_params(model) == 5_079_126
    code, _, err = run(capsys, "prune", str(out_dir), "--ratio", "0.2", "--no-latency",
                       "--out", str(tmp_path / "again"))
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["before"]["params"] == 5_079_126 > again["after"]["params"]

    # a second run onto the same directory is refused, and overwrites it with --force
    argv = ["prune", str(out_dir), "--ratio", "0.5", "--no-latency", "--out", str(tmp_path / "again")]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "holds a pruned model; give --force" in err
    code, _, err = run(capsys, *argv, "--force")
    assert code == 0, err
    forced = json.loads((tmp_path / "again" / "report.json").read_text())
    assert forced["before"]["params"] == 5_079_126 > again["after"]["params"] > forced["after"]["params"]


def test_prune_hybrid_on_images_with_options(capsys, tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("sklearn")
    code, out, err = run(capsys, "prune", "torchvision:resnet18", "--ratio", "0.5",
                         "--importance", "hybrid", "--alpha", "0.3", "--beta", "0.7",
                         "--calib-data", "sklearn-digits", "--calib-batches", "2",
                         "--batch-size", "4", "--ignore", "conv1", "--round-to", "8",
                         "--steps", "2", "--input-shape", "1,3,32,32", "--no-latency",
                         "--out", str(tmp_path / "h"))
    assert code == 0, err
    after = json.loads((tmp_path / "h" / "report.json").read_text())["after"]["layers"]
    by_name = {s["name"]: s for s in after}
    assert by_name["conv1"]["out_channels"] == 64  # ignored
    assert all(s["out_channels"] % 8 == 0 for s in after if s["type"] == "Conv2d")
    assert by_name["layer4.1.conv1"]["out_channels"] == 256


def test_prune_calib_from_tensor_file(capsys, tmp_path):
    pytest.importorskip("torchvision")
    torch.save(torch.randn(8, 3, 32, 32), tmp_path / "calib.pt")
    code, _, err = run(capsys, "prune", "torchvision:resnet18", "--ratio", "0.3",
                       "--importance", "activation", "--calib-data", str(tmp_path / "calib.pt"),
                       "--batch-size", "4", "--global", "--input-shape", "1,3,32,32",
                       "--no-latency", "--out", str(tmp_path / "a"))
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["after"]["params"] < report["before"]["params"]
    torch.save(torch.randn(8, 5, 32, 32), tmp_path / "wrong.pt")  # 5 channels: really read
    code, _, err = run(capsys, "prune", "torchvision:resnet18", "--ratio", "0.3",
                       "--importance", "activation", "--calib-data", str(tmp_path / "wrong.pt"),
                       "--input-shape", "1,3,32,32", "--no-latency", "--out", str(tmp_path / "b"))
    assert code != 0 and err


def test_prune_hugging_face_directory(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=48)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    code, out, err = run(capsys, "prune", f"hf:{tmp_path / 'bert'}", "--ratio", "0.25",
                         "--input-shape", "1,8", "--no-latency", "--out", str(tmp_path / "p"))
    assert code == 0, err
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert rep["after"]["params"] < rep["before"]["params"]
    # the saved directory rebuilds the model from the local Hugging Face directory
    code, _, err = run(capsys, "prune", str(tmp_path / "p"), "--ratio", "0.1", "--no-latency",
                       "--out", str(tmp_path / "p2"))
    assert code == 0, err


def test_inspect_lists_groups(capsys, tmp_path):
    pytest.importorskip("torchvision")
    code, out, err = run(capsys, "inspect", "torchvision:resnet18", "--input-shape", "1,3,32,32",
                         "--dot", str(tmp_path / "g.dot"))
    assert code == 0, err
    assert "channel groups" in out and "layer1.0.conv1.out" in out and "protected" in out
    assert (tmp_path / "g.dot").read_text().startswith("digraph")


@pytest.mark.parametrize("argv, message, status", [
    (["prune", "torchvision:resnet1", "--ratio", "0.3", "--out", "x"], "no model 'resnet1'", 2),
    (["prune", "nosuchthing", "--ratio", "0.3", "--out", "x"], "unknown model", 2),
    (["prune", "torchvision:resnet18", "--ratio", "1.5", "--out", "x"], "--ratio: must be a number in [0, 1)", 2),
    (["prune", "torchvision:resnet18", "--ratio", "0.3", "--out", "x", "--input-shape", "1,3,32,32",
      "--ignore", "fcc"], "no layer named 'fcc'; did you mean 'fc'", 1),
    (["prune", "torchvision:resnet18", "--ratio", "0.3", "--out", "x", "--importance", "magic"],
     "invalid choice", 2),
    (["prune", "hf:/no/such/dir", "--ratio", "0.3", "--out", "x"], "never downloads", 2),
    (["report", "/no/such/dir"], "cleanai: error: /no/such/dir does not exist", 2),
    (["frobnicate"], "invalid choice", 2),
    # a mistyped option is named, with the one meant, before any other complaint (--out missing)
    (["prune", "torchvision:resnet18", "--ration", "0.35", "--out", "x"],
     "cleanai: error: unknown option --ration; did you mean --ratio? (see cleanai prune --help)", 2),
    (["prune", "torchvision:resnet18", "--ration", "0.35"], "unknown option --ration; did you mean --ratio?", 2),
    (["inspect", "torchvision:resnet18", "--input_shape=1,3,32,32"],
     "unknown option --input_shape; did you mean --input-shape?", 2),
    (["inspect", "/no/such/dir"], "cleanai: error: /no/such/dir does not exist (a MODEL path must be "
                                  "a directory written by `cleanai prune --out DIR`)", 2),
    (["prune", "torchvision:resnet18", "--ratio", "0.3", "--out", "x", "--input-shape", "1,3,224"],
     "cleanai: error: --input-shape 1,3,224 does not fit torchvision:resnet18: it takes 4 numbers, "
     "N,C,H,W (e.g. 1,3,224,224)", 2),
    (["inspect", "torchvision:r3d_18", "--input-shape", "1,3,32,32"],
     "it takes 5 numbers, N,C,T,H,W (e.g. 1,3,16,112,112)", 2),
])
def test_bad_arguments_give_one_line_and_nonzero_exit(capsys, argv, message, status):
    pytest.importorskip("torchvision")
    code, out, err = run(capsys, *argv)
    assert code == status
    lines = [l for l in err.splitlines() if l.startswith("cleanai: error")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_out_is_checked_before_any_pruning_work(capsys, tmp_path, monkeypatch):
    cli_main = importlib.import_module("cleanai.cli.main")  # the package exports main() by that name
    monkeypatch.setattr(cli_main, "build_model", lambda spec: pytest.fail("built the model"))
    file, old, full = tmp_path / "file", tmp_path / "old", tmp_path / "full"
    file.write_text("not a directory")
    old.mkdir()
    (old / "cleanai.json").write_text("{}")
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    for out, message in [
            (file, f"--out {file} is a file; give a directory (new or empty)"),
            (file / "sub", f"--out {file / 'sub'}: {file} is a file, not a directory"),
            (old, f"--out {old} holds a pruned model; give --force to overwrite, or a new directory"),
            (full, f"--out {full} is not empty; give --force to overwrite, or a new directory")]:
        code, _, err = run(capsys, "prune", "torchvision:resnet18", "--ratio", "0.3", "--out", str(out))
        assert (code, err) == (2, f"cleanai: error: {message}\n")
    code, _, err = run(capsys, "prune", "torchvision:resnet18", "--ratio", "0.3", "--force",
                       "--out", str(file))
    assert code == 2 and "is a file" in err  # --force never replaces a file by a directory


def test_report_of_a_directory_without_a_model(capsys, tmp_path):
    code, _, err = run(capsys, "report", str(tmp_path))
    assert (code, err) == (2, f"cleanai: error: {tmp_path} holds no report.json or cleanai.json; "
                              f"give a directory written by `cleanai prune --out DIR` or "
                              f"cleanai.save_pruned\n")
    (tmp_path / "f").write_text("")
    code, _, err = run(capsys, "report", str(tmp_path / "f"))
    assert code == 2 and err.startswith(f"cleanai: error: {tmp_path / 'f'} is not a directory")
    (tmp_path / "cleanai.json").write_text("{not json")
    code, _, err = run(capsys, "report", str(tmp_path))
    assert code == 2 and "is not a readable CleanAI file" in err and "Traceback" not in err


def test_factory_spec_and_fashion_mnist_calibration(capsys, tmp_path):
    pytest.importorskip("torchvision")
    from cleanai.cli.data import FASHION_MNIST_DIR
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed")
    code, out, err = run(capsys, "prune", "torchvision.models:resnet18", "--ratio", "0.3",
                         "--importance", "hybrid", "--calib-data", "fashion-mnist",
                         "--calib-batches", "2", "--batch-size", "4",
                         "--input-shape", "1,3,32,32", "--no-latency", "--out", str(tmp_path / "f"))
    assert code == 0, err
    info = json.loads((tmp_path / "f" / "cleanai.json").read_text())
    assert info["meta"]["model"] == "torchvision.models:resnet18"
    assert info["meta"]["input_shape"] == [1, 3, 32, 32]
    code, out, err = run(capsys, "report", str(tmp_path / "f"))
    assert code == 0 and "params" in out


def test_prune_with_compensation_and_recovery(capsys, tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("sklearn")
    for recover in ("reconstruct:block", "distill:3"):
        code, out, err = run(capsys, "prune", "torchvision:resnet18", "--ratio", "0.3",
                             "--compensate", "lstsq", "--recover", recover,
                             "--calib-data", "sklearn-digits", "--calib-batches", "2",
                             "--batch-size", "8", "--input-shape", "1,3,32,32", "--no-latency",
                             "--out", str(tmp_path / recover.replace(":", "_")))
        assert code == 0, err
        assert ("reconstruction" if recover.startswith("re") else "distillation") in out
        assert "fidelity to the dense model: output cosine" in out
        saved = json.loads((tmp_path / recover.replace(":", "_") / "report.json").read_text())
        assert 0 < saved["fidelity"]["cosine"] <= 1
    code, _, err = run(capsys, "prune", "torchvision:resnet18", "--ratio", "0.3",
                       "--recover", "finetune", "--out", str(tmp_path / "x"))
    assert code == 2 and "reconstruct, reconstruct:block or distill[:STEPS]" in err


def test_prune_to_a_budget_and_by_search(capsys, tmp_path):
    pytest.importorskip("torchvision")
    code, out, err = run(capsys, "prune", "torchvision:resnet18", "--target-macs", "0.5",
                         "--input-shape", "1,3,32,32", "--no-latency", "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert "budget: macs 0.49" in out or "budget: macs 0.50" in out
    saved = json.loads((tmp_path / "b" / "report.json").read_text())
    assert saved["after"]["macs"] <= 0.5 * saved["before"]["macs"]
    code, out, err = run(capsys, "prune", "torchvision:resnet18", "--target-params", "0.6",
                         "--search", "--evaluations", "2", "--calib-batches", "2",
                         "--batch-size", "4", "--input-shape", "1,3,32,32", "--no-latency",
                         "--out", str(tmp_path / "s"))
    assert code == 0, err
    assert "search_ratios:" in out and "budget:" not in err
    saved = json.loads((tmp_path / "s" / "report.json").read_text())
    assert saved["after"]["params"] <= 0.6 * saved["before"]["params"]
    code, out, err = run(capsys, "prune", "torchvision:resnet18", "--target-macs", "0.5",
                         "--allocation", "sensitivity", "--calib-data", "sklearn-digits",
                         "--calib-batches", "2", "--batch-size", "4", "--input-shape",
                         "1,3,32,32", "--no-latency", "--out", str(tmp_path / "a"))
    assert code == 0, err
    saved = json.loads((tmp_path / "a" / "report.json").read_text())
    assert 0.49 * saved["before"]["macs"] <= saved["after"]["macs"] <= 0.5 * saved["before"]["macs"]
    assert saved["after"]["params"] != json.loads(
        (tmp_path / "b" / "report.json").read_text())["after"]["params"]  # other widths
    for argv, message in [(["--ratio", "0.3", "--target-macs", "0.5"], "not both"),
                          (["--target-macs", "0.5", "--search", "--allocation", "sensitivity"],
                           "give one"),
                          ([], "give --ratio or a budget"),
                          (["--ratio", "0.3", "--search"], "--search needs a budget"),
                          (["--target-macs", "1.5"], "--target-macs: must be a fraction")]:
        code, _, err = run(capsys, "prune", "torchvision:resnet18", *argv, "--out",
                           str(tmp_path / "x"))
        assert code == 2 and message in err, err


def test_prune_then_quantize_and_export(capsys, tmp_path):
    pytest.importorskip("torchao")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    code, out, err = run(capsys, "prune", f"hf:{tmp_path / 'llama'}", "--ratio", "0.25",
                         "--input-shape", "1,8", "--no-latency", "--quantize", "int8",
                         "--export", "pt2", "--out", str(tmp_path / "p"))
    assert code == 0, err
    assert "quantized: dynamic int8" in out and "int8 size on disk" in out
    assert f"exported pt2 to {tmp_path / 'p' / 'model.pt2'}" in out  # use_cache left aside
    assert (tmp_path / "p" / "model.pt2").is_file()
    code, _, err = run(capsys, "prune", f"hf:{tmp_path / 'llama'}", "--ratio", "0.25",
                       "--quantize", "int4", "--out", str(tmp_path / "q"))
    assert code == 2 and "invalid choice: 'int4'" in err
    code, out, err = run(capsys, "prune", f"hf:{tmp_path / 'llama'}", "--ratio", "0.25",
                         "--input-shape", "1,8", "--no-latency", "--export", "aoti", "--out",
                         str(tmp_path / "a"))
    assert code == 0, err
    package = tmp_path / "a" / "model.aoti.pt2"
    assert f"exported aoti to {package}" in out and "checked with AOTInductor" in out
    from cleanai.deploy import load
    compiled = load(str(package))
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert compiled(input_ids=ids, attention_mask=torch.ones_like(ids))[0].shape[:2] == (1, 8)
        ids = torch.randint(0, 64, (3, 8))  # --input-shape 1,8 compiled a batch of 1
        with pytest.raises(ValueError, match=r"kwargs\['input_ids'\] of shape \(1, 8\), got"):
            compiled(input_ids=ids, attention_mask=torch.ones_like(ids))
