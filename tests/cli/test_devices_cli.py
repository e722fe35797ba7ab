"""``--device`` on every command: ``auto`` on a machine without accelerators is the CPU, with identical results to
``--device cpu``; a device that is not there is one line, exit 2, and nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import nibble
from nibble.cli.main import main
from nibble.devices import cpu_has_native_bf16
from nibble.errors import NibbleError

NO_ACCELERATOR = not (torch.cuda.is_available() or torch.backends.mps.is_available() or torch.xpu.is_available())


def write_rows(path, n: int = 24):
    words = ("red", "green", "blue")
    rows = [{"text": f"{words[i % 3]} sky and {words[(i + 1) % 3]} sea", "label": words[i % 3]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run_dir(shared_checkpoint, tmp_path_factory):
    """A short qlora run with ``--device cpu``: (base model, data file, output directory)."""
    path, _ = shared_checkpoint("qwen3")
    root = tmp_path_factory.mktemp("devices")
    data = write_rows(root / "train.jsonl")
    args = ["--model", path, "--data", data, "--max-steps", "4", "--batch-size", "4", "--val-split", "0.25",
            "--log-every", "1", "--save-every", "0", "--lora-dropout", "0.1"]  # fmt: skip
    assert main(["train", *map(str, args), "--output", str(root / "cpu"), "--device", "cpu"]) == 0
    return path, data, root, args


@pytest.mark.cpu_bf16
@pytest.mark.skipif(not NO_ACCELERATOR, reason="on a machine with a GPU, auto is that GPU")
def test_auto_without_accelerators_gives_the_cpu_run_exactly(run_dir, capsys):
    path, data, root, args = run_dir
    capsys.readouterr()
    assert main(["train", *map(str, args), "--output", str(root / "auto"), "--device", "auto"]) == 0
    printed = capsys.readouterr().out
    assert "device cpu (" in printed
    # --dtype auto is bf16 exactly where the CPU computes it natively (or NIBBLE_CPU_BF16=1 says it does).
    assert f"dtype {'bfloat16' if cpu_has_native_bf16() else 'float32'} (auto)" in printed
    cpu, auto = root / "cpu", root / "auto"
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (cpu, auto))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())] for d in (cpu, auto)]
    assert losses[0] == losses[1] and len(losses[0]) >= 4
    report = json.loads((auto / "eval_report.json").read_text())
    assert report["memory"]["device"] == "cpu" and report["memory"]["peak_device_bytes"] is None
    assert report["memory"]["used_bytes"] > 0 and report["memory"]["estimate_bytes"] > 0
    record = json.loads((auto / "metrics.jsonl").read_text().splitlines()[0])
    assert record["peak_rss_bytes"] >= report["memory"]["rss_at_start_bytes"] and "peak_device_bytes" not in record


@pytest.mark.skipif(not NO_ACCELERATOR, reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "command",
    [
        ["train", "--model", "{base}", "--data", "{data}", "--output", "{out}"],
        ["eval", "--model", "{base}", "--adapter", "{adapter}", "--data", "{data}", "--output", "{out}"],
        ["predict", "--model", "{base}", "--adapter", "{adapter}", "--data", "{data}", "--output", "{out}/p.jsonl"],
        ["generate", "--model", "{base}", "--prompt", "hi"],
        ["merge", "--model", "{base}", "--adapter", "{adapter}", "--output", "{out}"],
        ["quantize", "--model", "{base}", "--output", "{out}"],
        ["plan", "--model", "{base}"],
    ],
    ids=lambda c: c[0],
)
def test_a_missing_device_is_one_line_exit_2_and_nothing_written(run_dir, tmp_path, capsys, command):
    path, data, root, _ = run_dir
    out = tmp_path / "out"
    names = dict(base=path, data=data, out=out, adapter=root / "cpu" / "adapter")
    capsys.readouterr()
    assert main([a.format(**names) for a in command] + ["--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: device 'cuda': CUDA is not available") and captured.err.count("\n") == 1
    assert "use --device cpu or auto" in captured.err
    assert not out.exists() and captured.out == ""


def test_load_model_takes_auto_and_device_strings(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")
    model = nibble.load_model(path, quantize="nf4", device="auto" if NO_ACCELERATOR else "cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert all(m.qweight.device.type == "cpu" for m in model.modules() if hasattr(m, "qweight"))
    with pytest.raises(NibbleError, match="device 'tpu' is not valid"):
        nibble.load_model(path, device="tpu")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--model", "{base}", "--adapter", "{adapter}", "--data", "{data}", "--output", "{out}"],
        ["predict", "--model", "{base}", "--adapter", "{adapter}", "--data", "{data}", "--output", "{out}/p.jsonl"],
        ["generate", "--model", "{base}", "--prompt", "hi", "--max-new-tokens", "1"],
    ],
    ids=lambda c: c[0],
)
def test_threads_flag_sets_torch_threads_and_the_device_line_says_so(
    run_dir, tmp_path, capsys, restore_threads, command
):
    path, data, root, _ = run_dir
    fill = {"base": path, "adapter": root / "cpu" / "adapter", "data": data, "out": tmp_path / "o"}
    torch.set_num_threads(2)
    capsys.readouterr()
    assert main([a.format(**fill) for a in command] + ["--device", "cpu", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    captured = capsys.readouterr()
    assert "device cpu (1 thread," in captured.out + captured.err


def test_train_takes_threads():
    from nibble.cli.main import build_parser

    args = build_parser("train").parse_args(["train", "--model", "m", "--data", "d", "--output", "o", "--threads", "3"])
    assert args.threads == 3
