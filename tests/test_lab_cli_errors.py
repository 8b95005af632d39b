"""User mistakes at the `cpl` command line: each ends in one line on stderr naming the path and
the problem, exit status 2, no traceback, and leaves nothing that blocks the corrected rerun.
Every case here fails before any model is built, so the file runs in seconds."""
import hashlib
import json
import os

import pytest

from cpl_lab.cli import main
from cpl_lab.config import LabConfig
from cpl_lab.runs import RunDir, RunExists

FAST = ["--threads", "1", "--no-progress", "--no-plots"]


@pytest.fixture(autouse=True)
def keep_threads():
    import torch
    n = torch.get_num_threads()  # the cli sets --threads process-wide; other tests keep theirs
    yield
    torch.set_num_threads(n)


def inject(capsys, *args):
    code = main(["inject", *FAST, *args])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cpl: error: "), err  # one line, no traceback
    return code, err


def test_out_at_a_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    code, err = inject(capsys, "--out", str(f))
    assert code == 2 and f"{f} is a file, not a folder" in err
    assert f.read_text() == "mine"


def test_out_under_a_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    code, err = inject(capsys, "--out", str(f / "run"))
    assert code == 2 and str(f / "run") in err and f"{f} is a file, not a folder" in err


def test_out_in_an_unwritable_folder(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:  # root ignores the mode: refuse the mkdir as the kernel would for others
        real = os.mkdir

        def mkdir(path, *args, **kwargs):
            if os.path.dirname(os.fspath(path)) == str(ro):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)
        monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        code, err = inject(capsys, "--out", str(ro / "run"))
    finally:
        ro.chmod(0o700)
    assert code == 2 and f"cannot create the run folder {ro / 'run'}" in err and "Permission denied" in err


def test_analyze_out_at_a_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert main(["analyze", *FAST, "--out", str(f)]) == 2
    assert f"analysis folder {f} is a file, not a folder" in capsys.readouterr().err


def test_failed_start_does_not_block_the_rerun(tmp_path, capsys):
    # A start that fails before its first cell leaves config.json and an empty cells/; the same
    # command again must fail for the same reason (or run), not refuse "already holds a run".
    out = tmp_path / "r"
    missing = tmp_path / "no-model"
    for _ in range(2):
        code, err = inject(capsys, "--model", str(missing), "--out", str(out))
        assert code == 2 and f"--model {missing}: not a local folder" in err
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n{oops\n')
    code, err = inject(capsys, "--data", str(data), "--out", str(out))
    assert code == 2 and f"{data}:2:" in err
    RunDir(out, LabConfig(methods=["ft"]))  # any configuration takes the unstarted folder over
    assert json.loads((out / "config.json").read_text())["methods"] == ["ft"]


def test_folder_that_is_not_an_unstarted_run_is_still_refused(tmp_path):
    model = tmp_path / "model"  # config.json alone does not make a folder a failed start
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(RunExists, match="already holds a run"):
        RunDir(model, LabConfig())
    run = RunDir(tmp_path / "r", LabConfig())
    run.save_cell({"method": "ft", "lr": 1e-3, "seed": 0, "rows": []})
    with pytest.raises(RunExists, match="already holds a run"):
        RunDir(tmp_path / "r", LabConfig())


def test_resume_refuses_changed_data(tmp_path, capsys):
    data = tmp_path / "facts.jsonl"
    data.write_text('{"question": "q1", "answer": "a"}\n{"question": "q2", "answer": "b"}\n')
    before = hashlib.sha256(data.read_bytes()).hexdigest()
    model = tmp_path / "no-model"  # were the resume accepted, the run would stop at the model
    cfg = LabConfig(data=str(data), model=str(model))
    out = tmp_path / "r"
    RunDir(out, cfg).save_cell({"method": "ft", "lr": 1e-3, "seed": 0, "rows": []})
    assert json.loads((out / "config.json").read_text())["data_sha256"] == before
    RunDir(out, cfg, resume=True)  # the same content resumes

    data.write_text('{"question": "q1", "answer": "a"}\n{"question": "q2", "answer": "c"}\n')
    after = hashlib.sha256(data.read_bytes()).hexdigest()
    code, err = inject(capsys, "--data", str(data), "--model", str(model), "--out", str(out), "--resume")
    assert code == 2
    assert f"--data {data} changed" in err and before in err and after in err
    assert json.loads((out / "config.json").read_text())["data_sha256"] == before


@pytest.mark.parametrize("content, line, words", [
    (b'{"question": "q", "answer": "a"}\n{"question": "\xff", "answer": "a"}\n', 2, "not UTF-8"),
    (b'{"question": "q", "answer": "a"}\n{"question": "q", "answer": ' + b"9" * 5000 + b"}\n", 2,
     "a number longer than 4300 digits"),
    (b"[" * 100_000 + b"\n", 1, "nested too deeply"),
    (b'{"question": "q? A. x B. y", "label": "A"}\n{"question": "r? A. x B. y", "label": "Z"}\n', 2,
     "label 'Z' is not one of the option letters A, B"),
], ids=["utf8", "huge-int", "deep", "label"])
def test_bad_data_names_file_and_line(tmp_path, capsys, content, line, words):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    code, err = inject(capsys, "--data", str(data), "--out", str(tmp_path / "r"))
    assert code == 2 and f"{data}:{line}: " in err and words in err, err


def test_truncated_model_config(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "hidden_si')
    code, err = inject(capsys, "--model", str(model), "--out", str(tmp_path / "r"))
    assert code == 2 and f"{model / 'config.json'}: not valid JSON" in err and "line 1 column" in err
