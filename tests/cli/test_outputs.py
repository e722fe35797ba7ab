"""Outputs and inputs outside train under hostile conditions, through the real CLI on a tiny model: an adapter
applied to another base than its own, writes into a file or read-only parent or onto a full disk, a symlink as
merge --overwrite's target, predict writing over its data, an existing report, a tokenizer larger than the model."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

import helpers
from nibble.cli.main import main

WORDS = {"neg": ["bad", "awful", "sad"], "pos": ["good", "great", "nice"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Qwen3, a LoRA classifier trained on it (2 steps), a model of the same shapes and other weights,
    and a byte copy of the base at another path."""
    root = tmp_path_factory.mktemp("outputs")
    base, _ = helpers.make_hf_checkpoint(root / "base", "qwen3")
    other, _ = helpers.make_hf_checkpoint(root / "other", "qwen3", seed=1)
    copy = root / "copy"
    shutil.copytree(base, copy)
    data = helpers.write_word_rows(root / "train.jsonl", WORDS, 16, seed=0)
    out = root / "out"
    args = ["train", "--model", base, "--data", data, "--output", out, "--batch-size", "4", "--max-steps", "2"]
    args += ["--val-split", "0", "--eval-every", "0", "--method", "lora"]
    assert main([str(a) for a in args]) == 0
    return SimpleNamespace(root=root, base=base, other=other, copy=copy, data=data, adapter=out / "adapter")


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_an_adapter_on_another_base_is_refused_unless_any_base(run, tmp_path, capsys):
    eval_args = ["eval", "--adapter", str(run.adapter), "--data", str(run.data)]
    capsys.readouterr()
    assert main([*eval_args, "--model", str(run.other)]) == 2
    one_line_error(capsys, "nibble.json: the adapter was trained on", "--any-base to apply it anyway")
    merge = ["merge", "--adapter", str(run.adapter), "--model", str(run.other)]
    assert main([*merge, "--output", str(tmp_path / "m")]) == 2
    one_line_error(capsys, "--any-base")
    assert not (tmp_path / "m").exists()
    assert main([*eval_args, "--model", str(run.other), "--any-base"]) == 0
    assert main([*merge, "--output", str(tmp_path / "m"), "--any-base"]) == 0
    assert main([*eval_args, "--model", str(run.copy)]) == 0  # the same weights at another path: its base


def test_an_adapter_without_nibble_json_is_checked_against_the_base_it_names(run, tmp_path, capsys):
    peft_only = tmp_path / "peft"
    shutil.copytree(run.adapter, peft_only)
    (peft_only / "nibble.json").unlink()
    config = json.loads((peft_only / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(run.base.resolve())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(peft_only), "--data", str(run.data), "--model", str(run.other)]) == 2
    one_line_error(capsys, "adapter_config.json: the adapter was trained on", "--any-base")
    assert main(["eval", "--adapter", str(peft_only), "--data", str(run.data), "--model", str(run.copy)]) == 0


def litter(directory):
    return [p for p in directory.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def merge_args(run, output, *extra):
    return ["merge", "--model", str(run.base), "--adapter", str(run.adapter), "--output", str(output), *extra]


def export_args(run, output, *extra):
    return ["export", "--model", str(run.base), "--output", str(output), "--eval-tokens", "0", *extra]


@pytest.mark.parametrize("command", ["merge", "export", "eval", "predict"])
def test_an_output_under_a_file_is_one_line_before_any_work(run, tmp_path, capsys, command):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / ("out.gguf" if command == "export" else "out")
    args = {
        "merge": merge_args(run, target),
        "export": export_args(run, target),
        "eval": ["eval", "--model", str(run.base), "--adapter", str(run.adapter), "--data", str(run.data)],
        "predict": ["predict", "--model", str(run.base), "--adapter", str(run.adapter), "--data", str(run.data)],
    }[command]
    if command in ("eval", "predict"):
        args += ["--output", str(target)]
    capsys.readouterr()
    assert main(args) == 2
    one_line_error(capsys, f"{tmp_path / 'file'}: is a file, not a directory")
    assert (tmp_path / "file").read_text() == "x" and not litter(tmp_path)


def test_a_read_only_parent_is_one_line(run, tmp_path, capsys, monkeypatch):
    import errno
    import os
    from pathlib import Path

    read_only = tmp_path / "ro"
    read_only.mkdir()
    if os.geteuid() != 0:
        read_only.chmod(0o555)
    else:  # root writes anywhere: the file system refuses instead, as a read-only mount does
        real_touch = Path.touch

        def touch(self, *args, **kwargs):
            if read_only in self.parents:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real_touch(self, *args, **kwargs)

        monkeypatch.setattr(Path, "touch", touch)
    capsys.readouterr()
    for args in (merge_args(run, read_only / "m"), export_args(run, read_only / "m.gguf")):
        assert main(args) == 2
        one_line_error(capsys, f"{read_only}: cannot write (", "check the directory or write elsewhere")
    read_only.chmod(0o755)
    assert list(read_only.iterdir()) == []


def test_a_full_disk_during_merge_or_export_is_one_line_leaving_nothing(run, tmp_path, capsys, monkeypatch):
    import errno
    import os

    import safetensors.torch

    import nibble.io.gguf.write as gguf_write

    def full(path):
        Path(path).write_bytes(b"\0" * 100)  # what the disk took before it was full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    from pathlib import Path

    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, filename, metadata=None: full(filename))
    real_write = gguf_write._write

    def write(writer, metadata, tensors, log):
        real_write(writer, metadata, tensors[:1], log)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf_write, "_write", write)
    capsys.readouterr()
    for args, target in ((merge_args(run, tmp_path / "m"), "m"), (export_args(run, tmp_path / "m.gguf"), "m.gguf")):
        assert main(args) == 2
        one_line_error(capsys, f"{tmp_path}: no space left on the device", "free some space or write elsewhere")
        assert not (tmp_path / target).exists() and not litter(tmp_path)


def test_merge_overwrite_onto_a_symlink_is_refused(run, tmp_path, capsys):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    capsys.readouterr()
    for name in ("link", "dangling"):
        assert main(merge_args(run, tmp_path / name, "--overwrite")) == 2
        one_line_error(capsys, f"{tmp_path / name}: is a symbolic link")
        assert (tmp_path / name).is_symlink()
    assert (tmp_path / "real" / "keep").read_text() == "mine" and not (tmp_path / "nowhere").exists()


def test_predict_output_equal_to_data_is_refused(run, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    shutil.copyfile(run.data, data)
    (tmp_path / "hard.jsonl").hardlink_to(data)
    before = data.read_bytes()
    capsys.readouterr()
    for output in (data, tmp_path / "." / "rows.jsonl", tmp_path / "hard.jsonl"):
        args = ["predict", "--model", str(run.base), "--adapter", str(run.adapter), "--data", str(data)]
        assert main([*args, "--output", str(output)]) == 2
        one_line_error(capsys, "is the --data file; predictions go to another file")
    assert data.read_bytes() == before


def test_an_existing_report_is_not_replaced_without_overwrite(run, tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text("earlier\n")
    eval_args = ["eval", "--model", str(run.base), "--adapter", str(run.adapter), "--data", str(run.data)]
    capsys.readouterr()
    assert main([*eval_args, "--output", str(report)]) == 2
    one_line_error(capsys, f"{report}: already exists", "--overwrite")
    assert report.read_text() == "earlier\n"
    gguf_report = tmp_path / "m.report.json"  # an export's report beside a .gguf that is not there
    gguf_report.write_text("earlier\n")
    assert main(export_args(run, tmp_path / "m.gguf")) == 2
    one_line_error(capsys, f"{gguf_report}: already exists", "--overwrite")
    assert gguf_report.read_text() == "earlier\n" and not (tmp_path / "m.gguf").exists()
    assert main([*eval_args, "--output", str(report), "--overwrite"]) == 0
    assert "accuracy" in json.loads(report.read_text())


def test_what_a_killed_merge_left_is_gone_after_the_next(run, tmp_path):
    left = helpers.killed_writer(tmp_path, "m")
    assert len(left) == 1
    assert main(merge_args(run, tmp_path / "m")) == 0
    assert (tmp_path / "m" / "config.json").is_file() and not litter(tmp_path)


def test_a_tokenizer_larger_than_the_embedding_is_one_line_at_load(run, tmp_path, capsys):
    small, _ = helpers.make_hf_checkpoint(
        tmp_path / "small", "qwen3", vocab_size=200, pad_token_id=0
    )  # its tokenizer: 259
    capsys.readouterr()
    commands = [
        ["train", "--model", str(small), "--data", str(run.data), "--output", str(tmp_path / "o"), "--max-steps", "1"],
        ["generate", "--model", str(small), "--prompt", "hi", "--max-new-tokens", "2"],
        ["export", "--model", str(small), "--output", str(tmp_path / "s.gguf"), "--eval-tokens", "0"],
    ]
    for args in commands:
        assert main(args) == 2, args
        one_line_error(capsys, f"{small / 'tokenizer.json'}: 259 tokens, but", "embeds 200 (vocab_size)")
    assert not (tmp_path / "o").exists() and not (tmp_path / "s.gguf").exists()
