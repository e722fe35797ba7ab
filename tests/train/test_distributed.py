"""``nibble train`` under torchrun on the CPU (gloo, 2 processes): the same steps as one process with the global
batch, rank 0 alone writing the run, exact and elastic resume, and one-line errors for bad set-ups."""

from __future__ import annotations

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

import helpers
from nibble.cli.main import main
from nibble.io.safetensors import load_file

WORDS = {"neg": ["bad", "awful", "poor", "sad"], "pos": ["good", "great", "nice", "fine"]}


def rows(n: int, seed: int) -> list[dict[str, str]]:
    """Texts of 1 to 6 words (so the ranks' slices pad to different lengths)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(sorted(WORDS))
        out.append({"text": " ".join(rng.choice(WORDS[label]) for _ in range(rng.randint(1, 6))), "label": label})
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    # 37 rows: batches of 8 leave a last batch of 5, which the two ranks split 3 + 2
    train, val = (
        helpers.write_jsonl(root / "train.jsonl", rows(37, 0)),
        helpers.write_jsonl(root / "val.jsonl", rows(9, 1)),
    )
    return SimpleNamespace(base=helpers.make_hf_checkpoint(root / "base", "qwen3")[0], train=train, val=val)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A tiny Qwen3 with a chat template, and instruction rows whose responses differ in length (so the ranks'
    slices hold different numbers of target tokens)."""
    from nibble.data.instruct import CHATML

    root = tmp_path_factory.mktemp("distributed-chat")
    base = helpers.make_hf_checkpoint(root / "base", "qwen3")[0]
    helpers.write_tokenizer(base, chat_template=CHATML)
    words = ["red", "blue", "green", "pink", "gold", "gray", "teal"]
    examples = [
        {"instruction": f"Repeat {w}." * (i % 3 + 1), "response": " ".join([w] * (i % 5 + 1))}
        for i, w in enumerate(words * 6)
    ]
    train = helpers.write_jsonl(root / "train.jsonl", examples[:37])
    return SimpleNamespace(base=base, train=train, val=helpers.write_jsonl(root / "val.jsonl", examples[37:]))


def train_args(toy, out: Path, batch: int, *extra) -> list[str]:
    args = ["train", "--model", toy.base, "--data", toy.train, "--val-data", toy.val, "--output", out]
    # lr 1e-3: with Adam a gradient element near 0 moves by up to lr whatever its rounding; at 3e-3 one of 512
    # weights ended 2e-5 apart after 6 steps (an fp32 summation order), at 1e-3 all within 8e-7
    args += ["--method", "lora", "--dtype", "float32", "--lora-dropout", 0.1, "--lr", 1e-3, "--warmup-ratio", 0]
    args += ["--batch-size", batch, "--max-steps", 6, "--log-every", 1, "--eval-every", 3, "--save-every", 3]
    args += ["--device", "cpu", "--lora-targets", "all-linear"]
    return [str(a) for a in [*args, *extra]]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*launch, "-m", "nibble", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=environment(), timeout=300, **kwargs)


def single(args: list[str], capsys) -> str:
    """Run ``nibble`` in this process (the one-process reference); returns what it printed."""
    capsys.readouterr()
    assert main(args) == 0
    return capsys.readouterr().out


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-8000:]
    return result


def test_two_ranks_of_four_train_as_one_process_of_eight_and_resume_on_one(toy, tmp_path, capsys):
    one, two, elastic = tmp_path / "one", tmp_path / "two", tmp_path / "elastic"
    single(train_args(toy, one, 8, "--lora-dropout", 0), capsys)
    said = ok(torchrun(2, train_args(toy, two, 4, "--lora-dropout", 0)))
    assert said.stdout.count("train: ") == 1  # rank 0 alone prints

    want, got = records(one, "train"), records(two, "train")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(want, got, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5, (a, b)
    for a, b in zip(records(one, "eval"), records(two, "eval"), strict=True):  # evaluation split over the ranks
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-6 and a["accuracy"] == b["accuracy"]
    theirs, ours = adapter(one), adapter(two)
    assert theirs.keys() == ours.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-3", "step-6"]

    # --shard-base: the dense frozen base sharded by FSDP2 instead of replicated, the same steps
    sharded = tmp_path / "sharded"
    ok(torchrun(2, train_args(toy, sharded, 4, "--lora-dropout", 0, "--shard-base")))
    assert all(abs(a["loss"] - b["loss"]) < 1e-6 for a, b in zip(want, records(sharded, "train"), strict=True))
    assert (sharded / "checkpoints" / "step-3" / "shards").is_dir()
    for key, value in adapter(sharded).items():
        torch.testing.assert_close(value, theirs[key], atol=1e-5, rtol=0)

    # elastic: the 2-rank checkpoint resumed by one process, whose --batch-size 4 adapts to the global 8
    resume = train_args(toy, elastic, 4, "--lora-dropout", 0, "--resume", two / "checkpoints" / "step-3")
    said = single(resume, capsys)
    assert "the one process now takes --batch-size 8" in said, said
    for run in (one, two, elastic):
        state = json.loads((run / "checkpoints" / "step-6" / "state.json").read_text())
        assert state["data"] == {"position": 6, "seed": 42, "examples": 37, "batch_size": 8}
    got = records(elastic, "train")
    assert [r["step"] for r in got] == [4, 5, 6]
    assert all(abs(a["loss"] - b["loss"]) < 1e-6 for a, b in zip(want[3:], got, strict=True)), (want, got)
    ours = adapter(elastic)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0)


def test_with_lora_dropout_two_ranks_of_four_and_two_micro_batches_of_four_train_as_one_batch_of_eight(
    toy, tmp_path, capsys
):
    """Dropout masks follow (seed, step, sequence, layer, position), not the rank or the micro-batch split: with
    --lora-dropout 0.1 two ranks of 4 and --grad-accum 2 x 4 take the one-process steps of 8."""
    one, two, accum, other = (tmp_path / name for name in ("one", "two", "accum", "other"))
    short = ["--max-steps", 4, "--eval-every", 0, "--save-every", 0]
    single(train_args(toy, one, 8, *short), capsys)
    ok(torchrun(2, train_args(toy, two, 4, *short)))
    single(train_args(toy, accum, 4, *short, "--grad-accum", 2), capsys)
    single(train_args(toy, other, 8, *short, "--lora-dropout", 0), capsys)
    want = records(one, "train")
    for run in (two, accum):
        got = records(run, "train")
        assert [r["step"] for r in got] == [1, 2, 3, 4]
        for a, b in zip(want, got, strict=True):
            assert abs(a["loss"] - b["loss"]) < 1e-6, (run.name, a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5, (run.name, a, b)
        theirs, ours = adapter(one), adapter(run)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0)
    # the dropout is on: without it the same run takes other steps
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(want, records(other, "train"), strict=True)) > 1e-4


def test_full_fine_tuning_shards_with_fsdp2_and_trains_as_one_process(chat, tmp_path, capsys):
    """Instruction tuning (each rank's loss weighed by its target tokens), with gradient accumulation."""
    one, two, elastic = tmp_path / "one", tmp_path / "two", tmp_path / "elastic"
    full = ["--task", "instruct", "--method", "full", "--lr", 1e-4, "--grad-accum", 2]
    single(train_args(chat, one, 4, *full), capsys)
    ok(torchrun(2, train_args(chat, two, 2, *full)))
    want, got = records(one, "train"), records(two, "train")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert all(abs(a["loss"] - b["loss"]) < 1e-6 for a, b in zip(want, got, strict=True)), (want, got)
    # the evaluation sums ~80 token losses of ~5.6 in fp32, split over the ranks: equal within fp32 rounding
    for a, b in zip(records(one, "eval"), records(two, "eval"), strict=True):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0)
    theirs = load_file(one / "model" / "model.safetensors")
    ours = load_file(two / "model" / "model.safetensors")  # consolidated from the shards
    assert theirs.keys() == ours.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0)
    # a sharded checkpoint: one safetensors file per rank, and no whole-model copy
    step = two / "checkpoints" / "step-3"
    assert len(list((step / "shards").glob("*.safetensors"))) == 2 and not (step / "trainable.safetensors").exists()
    listed = json.loads((step / "manifest.json").read_text())["files"]
    assert sorted(name for name in listed if name.startswith("shards/")) == sorted(
        f"shards/{p.name}" for p in (step / "shards").iterdir()
    )

    # read back by one process (torch.distributed.checkpoint reshards), it ends where the 1-process run did
    single(train_args(chat, elastic, 2, *full, "--resume", step), capsys)
    ours = load_file(elastic / "model" / "model.safetensors")
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0)


def test_full_fine_tuning_in_bf16_gathers_16bit_weights_and_trains_as_one_process(chat, tmp_path, capsys):
    """--dtype bfloat16: FSDP2 gathers the fp32 master weights in bf16 (the embeddings rounded where one process
    reads them in fp32), reduces in fp32 once per step of 2 micro-batches; 2 ranks x 2 against 1 x 4."""
    one, two = tmp_path / "one", tmp_path / "two"
    full = ["--task", "instruct", "--method", "full", "--lr", 1e-4, "--grad-accum", 2, "--dtype", "bfloat16"]
    full += ["--max-steps", 3, "--eval-every", 0, "--save-every", 0]
    single(train_args(chat, one, 4, *full), capsys)
    ok(torchrun(2, train_args(chat, two, 2, *full)))
    want, got = records(one, "train"), records(two, "train")
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(want, got, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=5e-3), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2), (a, b)
    theirs, ours = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    for key in theirs:  # (exported from the fp32 master weights, not from a 16-bit gathered copy)
        diff = (ours[key] - theirs[key]).abs()
        # Adam moves a weight by up to about lr a step whatever the size of its gradient: a tiny gradient of another
        # sign in one run moves it the other way; the bulk of the weights agree
        assert diff.max() <= 2 * 3 * 1e-4 and diff.mean() < 1e-5, (key, diff.max(), diff.mean())


def test_sharded_4bit_qlora_trains_as_one_process_and_resumes_bit_identical(toy, tmp_path, capsys):
    """--shard-base: FSDP2 over the NF4 base's bytes (double-quantized scales too), 2 ranks x 4 against 1 x 8."""
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    qlora = ["--method", "qlora", "--double-quant", "--lora-dropout", 0]
    single(train_args(toy, one, 8, *qlora), capsys)
    said = ok(torchrun(2, train_args(toy, two, 4, *qlora, "--shard-base")))
    assert "cache: none (the frozen 4-bit base is sharded over 2 ranks)" in said.stdout
    want, got = records(one, "train"), records(two, "train")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(want, got, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5, (a, b)
    for a, b in zip(records(one, "eval"), records(two, "eval"), strict=True):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-6 and a["accuracy"] == b["accuracy"]
    theirs, ours = adapter(one), adapter(two)
    assert theirs.keys() == ours.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0)
    config = "adapter/adapter_config.json"  # the PEFT adapter of a one-process run, the same base named
    assert (two / config).read_text() == (one / config).read_text()
    step = two / "checkpoints" / "step-3"  # the adapter and its optimizer state, sharded; no base in it
    assert len(list((step / "shards").glob("*.safetensors"))) == 2 and not (step / "trainable.safetensors").exists()

    ok(torchrun(2, train_args(toy, resumed, 4, *qlora, "--shard-base", "--resume", step)))
    assert [r["loss"] for r in records(resumed, "train")] == [r["loss"] for r in got[3:]]
    assert all(torch.equal(adapter(resumed)[k], ours[k]) for k in ours)

    # elastic: the sharded checkpoint read back by one process (torch.distributed.checkpoint reshards)
    elastic = tmp_path / "elastic"
    single(train_args(toy, elastic, 8, *qlora, "--resume", step), capsys)
    assert all(abs(a["loss"] - b["loss"]) < 1e-6 for a, b in zip(want[3:], records(elastic, "train"), strict=True))
    for key, value in adapter(elastic).items():
        torch.testing.assert_close(value, theirs[key], atol=1e-5, rtol=0)


def test_a_hybrid_moe_trains_as_one_process_replicated_and_with_its_4bit_experts_sharded(tmp_path, capsys):
    """Qwen3-Next (Gated DeltaNet and gated attention, NF4 experts and a shared expert): DDP and --shard-base (the
    experts sharded by rows like every 4-bit weight), LoRA on attention, DeltaNet and experts and a trained router,
    2 ranks x 4 against 1 x 8."""
    base = helpers.make_hf_checkpoint(tmp_path / "base", "qwen3_next", mlp_only_layers=[0])[0]
    toy = SimpleNamespace(base=base, train=helpers.write_jsonl(tmp_path / "train.jsonl", rows(21, 0)),
                          val=helpers.write_jsonl(tmp_path / "val.jsonl", rows(5, 1)))  # fmt: skip
    qlora = ["--method", "qlora", "--lora-dropout", 0, "--train-router", "--max-steps", 3, "--save-every", 0]
    single(train_args(toy, tmp_path / "one", 8, *qlora), capsys)
    want, theirs = records(tmp_path / "one", "train"), adapter(tmp_path / "one")
    assert any("experts" in key for key in theirs) and any("linear_attn" in key for key in theirs)
    for name, extra in (("ddp", []), ("sharded", ["--shard-base"])):
        said = ok(torchrun(2, train_args(toy, tmp_path / name, 4, *qlora, *extra)))
        assert ("cache: none (the frozen 4-bit base is sharded over 2 ranks)" in said.stdout) == bool(extra)
        got = records(tmp_path / name, "train")
        assert [r["step"] for r in got] == [1, 2, 3]
        for a, b in zip(want, got, strict=True):
            assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5, (name, a, b)
        ours = adapter(tmp_path / name)
        assert theirs.keys() == ours.keys(), name
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0, msg=f"{name} {key}")


def test_sharded_int4_qlora_instruction_tuning_trains_as_one_process(chat, tmp_path, capsys):
    """INT4 base, each rank's loss weighed by its target tokens, gradient accumulation."""
    one, two = tmp_path / "one", tmp_path / "two"
    qlora = ["--task", "instruct", "--method", "qlora", "--quant-format", "int4", "--group-size", 64, "--grad-accum", 2]
    qlora += ["--lora-dropout", 0]
    single(train_args(chat, one, 4, *qlora), capsys)
    ok(torchrun(2, train_args(chat, two, 2, *qlora, "--shard-base")))
    want, got = records(one, "train"), records(two, "train")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert all(abs(a["loss"] - b["loss"]) < 1e-6 for a, b in zip(want, got, strict=True)), (want, got)
    theirs, ours = adapter(one), adapter(two)
    assert theirs.keys() == ours.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0)


def test_each_rank_holds_its_share_of_the_4bit_base_and_gathers_it_exactly(toy, tmp_path):
    """Per format: the bytes of the packed weights and their scales each rank keeps, against the whole (the
    exactness of the gathered weights and of a sharded forward is asserted by the ranks themselves)."""
    script = Path(__file__).resolve().parents[1] / "sharded_base.py"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    ok(subprocess.run([*launch, toy.base, tmp_path], capture_output=True, text=True, env=environment(), timeout=300))
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert sorted(ranks[0]) == ["int4", "nf4", "nf4+dq"]
    for fmt in ranks[0]:
        held = [rank[fmt] for rank in ranks]
        assert held[0]["total"] == held[1]["total"] and held[0]["total"] > held[0]["packed_total"] > 0
        assert held[0]["local"] + held[1]["local"] == held[0]["total"]  # split, not replicated
        for mine in held:
            assert mine["packed_local"] * 2 == mine["packed_total"]  # the packed bytes: exactly half each
            assert abs(mine["local"] / mine["total"] - 0.5) < 0.01, (fmt, mine)


def test_shard_base_without_torchrun_or_with_dense_copies_is_one_line(toy, tmp_path, capsys):
    assert main(train_args(toy, tmp_path / "run", 4, "--method", "qlora", "--shard-base")) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --shard-base splits the frozen base over the ranks of a torchrun launch, and this is one process; "
        "start it with torchrun --nproc-per-node N (N >= 2), or drop --shard-base"
    ]
    assert not (tmp_path / "run").exists()
    from nibble.errors import NibbleError
    from nibble.train.config import TrainConfig

    with pytest.raises(NibbleError, match=r"^'cache_budget_mb' keeps whole dense copies .* with --shard-base$"):
        TrainConfig(model="m", data="d", output="o", shard_base=True, cache_budget_mb=64).validate()
    TrainConfig(model="m", data="d", output="o", shard_base=True, cache_budget_mb=0).validate()


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The process id of rank ``rank`` among the workers torchrun started (read from their environments)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def launch_until(cmd: list[str], appears: Path) -> subprocess.Popen:
    """Start ``cmd`` and return once ``appears`` exists (the run still going)."""
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    deadline = time.monotonic() + 240
    while not appears.is_dir() and launcher.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert launcher.poll() is None, f"the run ended before {appears.name}: {launcher.communicate()[1][-3000:]}"
    return launcher


def test_a_killed_rank_fails_the_run_a_signal_stops_every_rank_and_resume_ends_bit_identical(toy, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    steps = ["--max-steps", 14, "--save-every", 2, "--eval-every", 6, "--keep-checkpoints", 2]
    ok(torchrun(2, train_args(toy, whole, 4, *steps)))  # dropout 0.1: every rank's generator must resume too
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "nibble"]

    # SIGKILL of rank 1: torchrun stops the other rank and fails
    launcher = launch_until([*launch, *train_args(toy, killed, 4, *steps)], killed / "checkpoints" / "step-2")
    os.kill(rank_pid(launcher, 1), signal.SIGKILL)
    launcher.communicate(timeout=240)
    assert launcher.returncode != 0 and not (killed / "adapter").exists()

    # SIGTERM to torchrun, which passes it to both ranks: they stop after the same step, with a checkpoint
    resume = [*launch, *train_args(toy, killed, 4, *steps, "--resume")]
    launcher = launch_until(resume, killed / "checkpoints" / "step-6")
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=240)
    said = [line for line in err.splitlines() if line.startswith("interrupted at step ")]
    assert len(said) == 1 and said[0].endswith("--keep-checkpoints 2 --resume"), err[-3000:]
    assert "; resume with: torchrun --nproc-per-node=2 -m nibble train " in said[0]
    stopped = int(said[0].split()[3].rstrip(";"))
    assert (killed / "checkpoints" / f"step-{stopped}").is_dir() and not (killed / "adapter").exists()

    ok(torchrun(2, train_args(toy, killed, 4, *steps, "--resume")))
    want, got = records(whole, "train"), records(killed, "train")
    assert [r["step"] for r in got] == list(range(1, 15))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    theirs, ours = adapter(whole), adapter(killed)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_ranks_started_with_different_settings_stop_with_one_line(toy, tmp_path):
    script = tmp_path / "launch.py"
    args = train_args(toy, tmp_path / "run", 4)
    script.write_text(
        "import os, sys\n"
        "from nibble.cli.main import main\n"
        f"args = {args!r}\n"
        "sys.exit(main(args + (['--lr', '0.002'] if os.environ['RANK'] == '1' else [])))\n"
    )
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    result = subprocess.run(launch, capture_output=True, text=True, env=environment(), timeout=300)
    assert result.returncode != 0
    assert "error: rank 1 was started with lr=0.002, rank 0 with 0.001; start every rank with the same" in result.stderr
    assert "Traceback" not in result.stderr.split("error: rank 1")[0][-2000:]
    assert not (tmp_path / "run").exists()


def test_nccl_without_cuda_is_one_line(toy, tmp_path):
    env = {**environment(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    cmd = [sys.executable, "-m", "nibble", *train_args(toy, tmp_path / "run", 4, "--dist-backend", "nccl")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --dist-backend nccl needs CUDA devices, this rank computes on cpu; use --dist-backend gloo (or auto)"
    ]


def test_a_global_micro_batch_the_ranks_cannot_share_names_the_batch_size(tmp_path):
    from nibble.errors import NibbleError
    from nibble.train.config import TrainConfig
    from nibble.train.distributed import Parallel
    from nibble.train.outdir import global_micro_batch

    step = tmp_path / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"data": {"batch_size": 9}}))
    config = TrainConfig(batch_size=4)
    assert global_micro_batch(config, step, Parallel(0, 3, 0)).batch_size == 3
    assert global_micro_batch(config, step, Parallel(0, 1, 0)).batch_size == 9
    with pytest.raises(NibbleError, match=r"which 2 ranks cannot share evenly; .* with --batch-size 9 // ranks"):
        global_micro_batch(config, step, Parallel(1, 2, 1))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("variables", "said"),
    [
        ({"WORLD_SIZE": "1", "RANK": "1"}, "RANK=1 and WORLD_SIZE=1: ranks run from 0 to 0"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "2"}, "LOCAL_RANK=2 and WORLD_SIZE=2"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: a launch has at least one rank"),
        ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x' is not a rank number"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set, and WORLD_SIZE=2"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"}, "not a port number"),
    ],
)
def test_torchrun_environment_misuse_is_one_line(toy, tmp_path, capfd, monkeypatch, variables, said):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    capfd.readouterr()
    assert main(train_args(toy, tmp_path / "out", 4)) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: environment variable") and err.count("\n") == 1 and said in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_that_never_comes_is_one_line_after_a_bounded_wait(toy, tmp_path, capfd, monkeypatch, rank):
    from datetime import timedelta

    from nibble.train import distributed

    monkeypatch.setattr(distributed, "JOIN_TIMEOUT", timedelta(seconds=2))
    env = {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
    for key, value in {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    capfd.readouterr()
    assert main(train_args(toy, tmp_path / "out", 4)) == 2
    err = capfd.readouterr().err
    said = "only 1 of 2 ranks arrived at 127.0.0.1:" if rank == 0 else "rank 1 of 2: nothing answered at MASTER_ADDR"
    assert err.startswith("error: rank ") and err.count("\n") == 1 and said in err and "within 2 s" in err, err


def test_ranks_launched_by_hand_meet_at_master_addr():
    """Without torchrun's agent rank 0 hosts the store the ranks meet at."""
    code = (
        "import torch, torch.distributed as dist\n"
        "from nibble.train import distributed\n"
        "part = distributed.from_environment()\n"
        "distributed.start(part, torch.device('cpu'), 'gloo')\n"
        "t = torch.tensor([part.rank + 1.0]); dist.all_reduce(t); print(int(t.item()), file=__import__('sys').stderr)\n"
        "distributed.stop()\n"
    )
    port = str(free_port())
    ranks = []
    for rank in (1, 0):  # the second rank starts first: it waits for rank 0
        env = {**environment(), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        ranks.append(subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True))
    for process in ranks:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0 and err.strip().endswith("3"), err


def test_rank_0_alone_speaks_its_data_lines_and_the_signal_line(toy, tmp_path):
    """With an empty token cache both ranks tokenize, yet each file's token-cache line is printed once; the first
    SIGTERM's line comes once; torch's deprecation warnings on the DDP wrapper are not printed per rank."""
    out = tmp_path / "run"
    steps = ["--max-steps", 40, "--save-every", 2, "--eval-every", 40]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "nibble"]
    env = {**environment(), "NIBBLE_TOKEN_CACHE": str(tmp_path / "tokens")}
    launcher = subprocess.Popen(
        [*launch, *train_args(toy, out, 4, *steps)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step-2").is_dir() and launcher.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    launcher.send_signal(signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=240)
    assert launcher.returncode != 0, stderr[-3000:]
    for name in ("train.jsonl", "val.jsonl"):
        said = [line for line in stdout.splitlines() if line.startswith("tokens: ") and name in line]
        assert len(said) == 1, stdout
    assert stderr.count("SIGTERM: stopping after this step") == 1, stderr[-3000:]
    assert "FutureWarning" not in stderr and "broadcast_buffers" not in stderr, stderr[-3000:]
    assert stdout.count("train: ") == 1


def test_fsdp2_gathers_16bit_weights_and_reduces_gradients_once_per_accumulated_step(tmp_path, monkeypatch):
    """In this process, a world of one: full fine-tuning sharded with bf16 gathering (fp32 master weights) reduces
    each unit's gradients once in a step of 3 micro-batches, and computes what one process computes from the same
    weights with the embeddings rounded to bf16 (the one input autocast does not round)."""
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    from helpers import label_task
    from nibble.data import BatchStream, ClassificationData, LabelMap
    from nibble.model import DecoderModel, ModelConfig
    from nibble.train import TrainConfig
    from nibble.train.distributed import shard_model
    from nibble.train.trainer import Trainer

    shape = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    config = ModelConfig(**shape, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    ids = [[1 + (7 * i + j) % 60 for j in range(3 + i % 4)] for i in range(12)]
    data = ClassificationData(ids, [i % 2 for i in range(12)], LabelMap([0, 1]))
    cfg = TrainConfig(model="m", data="d", output=str(tmp_path), dtype="bfloat16", batch_size=2, grad_accum=3)

    def step(shard: bool, round_embeddings: bool = False) -> tuple[float, float]:
        torch.manual_seed(0)
        model = DecoderModel(config, task="classify", num_labels=2)
        if round_embeddings:
            weight = model.model.embed_tokens.weight
            weight.data = weight.data.bfloat16().float()
        gathered = []
        if shard:
            shard_model(model, torch.device("cpu"), torch.bfloat16)
            model.model.layers[0].register_forward_pre_hook(lambda m, _: gathered.append(m.mlp.up_proj.weight.dtype))
        stream = BatchStream(data, cfg.batch_size, 0, cfg.seed)
        trainer = Trainer(model=model, stream=stream, config=cfg, out=tmp_path, total_steps=1, task=label_task(data))
        loss, norm, _, _ = trainer.step()
        if shard:
            assert gathered == [torch.bfloat16] * 3
            assert {p.dtype for p in model.parameters()} == {torch.float32}  # the sharded master weights
        return float(loss), float(norm)

    reductions = []
    reduce = _fsdp_param_group.foreach_reduce
    monkeypatch.setattr(_fsdp_param_group, "foreach_reduce", lambda *a, **k: reductions.append(1) or reduce(*a, **k))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        loss, norm = step(shard=True)
    finally:
        dist.destroy_process_group()
    assert len(reductions) == 4  # embeddings, 2 blocks, root: once each, not once per micro-batch
    same_loss, same_norm = step(shard=False, round_embeddings=True)
    assert loss == same_loss
    # the gradients of the 16-bit weights are computed in bf16, then accumulated in fp32
    assert norm == pytest.approx(same_norm, rel=1e-3)
    assert step(shard=False)[0] == pytest.approx(loss, rel=1e-2)
