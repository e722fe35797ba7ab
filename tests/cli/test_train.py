"""``nibble train/eval/predict`` end to end on a tiny Qwen3: PEFT reloads the adapter with equal probabilities,
the loss falls, a SIGKILLed run resumes to the same weights, and every bad input is one line and exit 2."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import helpers
from nibble.cli.main import main

WORDS = {
    "neg": ["bad", "awful", "poor", "sad", "ugly"],
    "pos": ["good", "great", "fine", "nice", "kind"],
    "zero": ["okay", "meh", "so-so", "fair", "plain"],
}


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_rows(n: int, seed: int, multi: bool = False):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if multi:
            labels = sorted(rng.sample(sorted(WORDS), rng.randint(1, 2)))
            words = [rng.choice(WORDS[lab]) for lab in labels for _ in range(2)]
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "labels": labels})
        else:
            label = rng.choice(sorted(WORDS))
            rows.append({"text": " ".join(rng.choice(WORDS[label]) for _ in range(rng.randint(2, 5))), "label": label})
    return rows


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    base, _ = helpers.make_hf_checkpoint(root / "base", "qwen3")
    return SimpleNamespace(
        root=root,
        base=base,
        train=write_rows(root / "train.jsonl", toy_rows(90, seed=0)),
        val=write_rows(root / "val.jsonl", toy_rows(24, seed=1)),
    )


def train(toy, out, *extra):
    """A toy run in fp32 (its predictions are compared with fp32 references; eval and predict reuse the run's dtype)."""
    args = ["train", "--model", str(toy.base), "--data", str(toy.train), "--output", str(out), "--dtype", "float32"]
    args += ["--max-steps", "30", "--lr", "5e-3", "--batch-size", "8", "--eval-every", "10", "--save-every", "10"]
    return main(args + [str(x) for x in extra])


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def hf_probs(model_dir, adapter, texts, num_labels, dequantize=None):
    """Probabilities from transformers (+ PEFT) on ``texts``, the base projections optionally replaced."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    if dequantize is not None:
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.rsplit(".", 1)[-1].endswith("_proj"):
                    module.weight.copy_(dequantize(module.weight))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    batch = AutoTokenizer.from_pretrained(model_dir)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits.softmax(-1)


def predictions(toy, out, *args):
    path = out / "pred.jsonl"
    assert main(["predict", "--model", *map(str, args), "--data", str(toy.val), "--output", str(path)]) == 0
    return [json.loads(line) for line in path.read_text().splitlines()]


def nf4_roundtrip(double_quant):
    from nibble.quant import nf4

    return lambda w: nf4.quantize(w, double_quant=double_quant).dequantize(torch.float32)


@pytest.mark.parametrize(
    "method,extra,dequantize",
    [
        ("qlora", [], nf4_roundtrip(False)),
        ("qlora", ["--double-quant", "--lora-targets", "all-linear", "--use-rslora"], nf4_roundtrip(True)),
        ("lora", ["--lora-targets", "q_proj,o_proj,up_proj"], None),
    ],
)
@pytest.mark.cpu_bf16
def test_adapter_reloads_in_peft_with_equal_probabilities(toy, tmp_path, method, extra, dequantize):
    out = tmp_path / "out"
    assert train(toy, out, "--method", method, "--val-data", toy.val, "--lora-dropout", "0.1", *extra) == 0
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert json.loads((adapter / "label_map.json").read_text())["labels"] == ["neg", "pos", "zero"]
    assert (adapter / "tokenizer.json").is_file()

    preds = predictions(toy, out, toy.base, "--adapter", adapter)
    texts = [json.loads(line)["text"] for line in toy.val.read_text().splitlines()]
    expected = hf_probs(toy.base, adapter, texts, 3, dequantize)
    torch.testing.assert_close(torch.tensor([list(p["probs"].values()) for p in preds]), expected, rtol=1e-5, atol=1e-6)
    assert {p["label"] for p in preds} <= {"neg", "pos", "zero"}

    # The loss falls on this learnable task, and the run leaves its reports behind.
    train_losses = [r["loss"] for r in records(out) if r["kind"] == "train"]
    assert train_losses[-1] < 0.5 * train_losses[0]
    report = json.loads((out / "eval_report.json").read_text())
    assert report["accuracy"] >= 0.9 and report["step"] == 30
    for name in ("loss.png", "accuracy.png", "confusion_matrix.png"):
        assert (out / "plots" / name).is_file()
    assert (out / "best" / "adapter_model.safetensors").is_file()
    assert (out / "config.yaml").read_text().count(f"method: {method}") == 1
    assert main(["eval", "--model", str(toy.base), "--adapter", str(adapter), "--data", str(toy.val),
                 "--output", str(out / "report.json")]) == 0  # fmt: skip
    again = json.loads((out / "report.json").read_text())
    assert again["loss"] == pytest.approx(report["loss"], rel=1e-5) and again["accuracy"] == report["accuracy"]


@pytest.mark.cpu_bf16
def test_full_fine_tuning_writes_a_checkpoint_transformers_loads(toy, tmp_path):
    out = tmp_path / "out"
    assert train(toy, out, "--method", "full", "--max-steps", "8", "--lr", "1e-3", "--val-split", "0.2") == 0
    model_dir = out / "model"
    assert not (out / "adapter").exists()
    trained = load_file(model_dir / "model.safetensors")
    base = load_file(toy.base / "model.safetensors")
    assert torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(trained["model.norm.weight"], base["model.norm.weight"])
    preds = predictions(toy, out, model_dir)
    texts = [json.loads(line)["text"] for line in toy.val.read_text().splitlines()]
    expected = hf_probs(model_dir, None, texts, 3)
    torch.testing.assert_close(torch.tensor([list(p["probs"].values()) for p in preds]), expected, rtol=1e-5, atol=1e-6)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForSequenceClassification"] and config["id2label"]["1"] == "pos"


def test_multi_label_trains_with_bce(toy, tmp_path):
    data = write_rows(tmp_path / "multi.jsonl", toy_rows(90, seed=2, multi=True))
    val = write_rows(tmp_path / "multi_val.jsonl", toy_rows(16, seed=3, multi=True))
    out = tmp_path / "out"
    rc = main(["train", "--model", str(toy.base), "--data", str(data), "--val-data", str(val), "--output", str(out),
               "--max-steps", "30", "--lr", "5e-3", "--method", "lora", "--eval-every", "0"])  # fmt: skip
    assert rc == 0
    assert json.loads((out / "adapter" / "label_map.json").read_text()) == {
        "labels": ["neg", "pos", "zero"],
        "multi_label": True,
    }
    report = json.loads((out / "eval_report.json").read_text())
    pred_path = tmp_path / "pred.jsonl"
    assert main(["predict", "--model", str(toy.base), "--adapter", str(out / "adapter"), "--data", str(val),
                 "--output", str(pred_path)]) == 0  # fmt: skip
    preds = [json.loads(line) for line in pred_path.read_text().splitlines()]
    probs = torch.tensor([list(p["probs"].values()) for p in preds], dtype=torch.float64)
    truth = torch.tensor([[lab in json.loads(r)["labels"] for lab in WORDS] for r in val.read_text().splitlines()])
    bce = -(truth * probs.log() + (~truth) * (1 - probs).log()).mean()
    assert report["loss"] == pytest.approx(float(bce), rel=1e-4)  # the val loss is BCE over labels
    assert all(isinstance(p["label"], list) for p in preds)
    losses = [r["loss"] for r in records(out) if r["kind"] == "train"]
    assert losses[-1] < 0.6 * losses[0] and report["macro_f1"] >= 0.7


def test_yaml_config_with_flag_overrides(toy, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {toy.base}\ndata: {toy.train}\noutput: {out}\nmethod: lora\nmax_steps: 3\nbatch_size: 4\n"
        "log_every: 1\nclass_weights: inverse_freq\noversample: true\ndtype: bfloat16\n"
    )
    assert main(["train", str(config), "--max-steps", "5", "--lora-rank", "2", "--val-split", "0"]) == 0
    resolved = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    assert resolved["max_steps"] == 5 and resolved["lora_rank"] == 2 and resolved["batch_size"] == 4
    assert resolved["class_weights"] == "inverse_freq" and resolved["dtype"] == "bfloat16"
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5]
    assert load_file(out / "adapter" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    ].shape == (2, 64)
    assert not (out / "eval_report.json").exists()  # no validation data, no report
    # A second run into the same directory must not silently replace the first.
    assert main(["train", str(config)]) == 2


def run_cli(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "nibble", *map(str, args)], env=env, **kwargs)


def test_resume_after_sigkill_gives_bit_identical_weights(toy, tmp_path):
    common = ["train", "--model", toy.base, "--data", toy.train, "--max-steps", "80", "--batch-size", "4",
              "--grad-accum", "2", "--lr", "2e-3", "--lora-dropout", "0.2", "--eval-every", "25",
              "--save-every", "10", "--log-every", "5"]  # fmt: skip
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reference = run_cli(*common, "--output", tmp_path / "ref", **quiet)
    victim = run_cli(*common, "--output", tmp_path / "run", **quiet)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())):
        assert victim.poll() is None and time.monotonic() < deadline, victim.stderr.read()
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (tmp_path / "run" / "adapter").exists()
    resumed = run_cli(*common, "--output", tmp_path / "run", "--resume", **quiet)
    assert resumed.wait() == 0, resumed.stderr.read()
    assert reference.wait() == 0, reference.stderr.read()

    ours = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert [r["step"] for r in records(tmp_path / "run")] == [r["step"] for r in records(tmp_path / "ref")]


def bad_data(toy, tmp_path):
    lines = [json.dumps(r) for r in toy_rows(6, seed=4)]
    lines[2] = lines[2][:-3]
    (tmp_path / "broken.jsonl").write_text("\n".join(lines) + "\n")
    write_rows(tmp_path / "val_bad.jsonl", [{"text": "good", "label": "pos"}, {"text": "hm", "label": "maybe"}])
    return tmp_path


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "{root}/missing"], r"missing: no such model directory"),
        (["--data", "{tmp}/broken.jsonl"], r"broken.jsonl line 3: not valid JSON"),
        (["--val-data", "{tmp}/val_bad.jsonl"], r"val_bad.jsonl line 2: label 'maybe' is not one of the training"),
        (["--text-column", "body"], r"train.jsonl line 1: no 'body' field"),
        (["--lora-targets", "qkv_proj"], r"lora_targets: no linear layer named qkv_proj"),
    ],
)
def test_bad_inputs_are_one_line_and_leave_no_output(toy, tmp_path, capsys, args, message):
    bad_data(toy, tmp_path)
    out = tmp_path / "out"
    args = [a.format(root=toy.root, tmp=tmp_path) for a in args]
    assert train(toy, out, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert __import__("re").search(message, err), err
    assert not out.exists()


def test_compile_without_a_compiler_is_one_line(toy, tmp_path):
    env = {**os.environ, "CXX": "/nonexistent/c++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "kernels")}
    args = ["train", "--model", toy.base, "--data", toy.train, "--output", tmp_path / "out", "--compile"]
    done = subprocess.run([sys.executable, "-m", "nibble", *map(str, args)], env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: --compile: torch.compile cannot build kernels on cpu"), done.stderr
    assert done.stderr.count("\n") == 1 and "leave --compile off" in done.stderr
    assert not (tmp_path / "out" / "adapter").exists()


def test_nan_loss_stops_with_last_good_checkpoint(toy, tmp_path, capsys):
    out = tmp_path / "out"
    assert train(toy, out, "--lr", "1e30", "--save-every", "1", "--warmup-ratio", "0", "--max-grad-norm", "0") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(not finite); training stopped and the last good checkpoint is" in err, err
    assert not (out / "adapter").exists()
    last = err.split("checkpoint is ")[1].split(";")[0]
    assert Path(last).parent == out / "checkpoints"
    weights = load_file(Path(last) / "trainable.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_eval_and_predict_errors_are_one_line(toy, tmp_path, capsys):
    bad = bad_data(toy, tmp_path)
    missing = ["predict", "--model", str(toy.base), "--adapter", str(tmp_path / "none"), "--data", str(toy.val)]
    assert main([*missing, "--output", str(tmp_path / "p.jsonl")]) == 2
    assert "no such adapter directory" in capsys.readouterr().err
    out = tmp_path / "out"
    assert train(toy, out, "--max-steps", "2", "--val-split", "0", "--method", "lora") == 0
    capsys.readouterr()
    args = ["eval", "--model", str(toy.base), "--adapter", str(out / "adapter"), "--data", str(bad / "val_bad.jsonl")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "val_bad.jsonl line 2: label 'maybe'" in err
    assert not (tmp_path / "p.jsonl").exists()
