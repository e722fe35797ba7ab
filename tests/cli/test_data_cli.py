"""The data a practitioner holds, through the real CLI on tiny models: every format trains the same adapter,
instruction schemas and --columns, --chat-template (and the default system prompt it injects), eval on
instruction data against transformers + PEFT, predict's ids, label names and CSV, and a file larger than the
process may hold trained under a memory limit."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import helpers
from gguf_files import CHATML
from nibble.cli.main import main

WORDS = {"neg": ["bad", "awful", "poor"], "pos": ["good", "great", "fine"], "zero": ["okay", "meh", "plain"]}
INJECTS_SYSTEM = (  # renders a default system message when the conversation has none
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{% if not (m['role'] == 'system' and loop.first) %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def labelled_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(sorted(WORDS))
        rows.append({"text": " ".join(rng.choice(WORDS[label]) for _ in range(3)), "label": label, "id": f"r{i}"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-cli")
    base, _ = helpers.make_hf_checkpoint(root / "base", "qwen3")
    chat, _ = helpers.make_hf_checkpoint(root / "chat", "qwen3")
    helpers.write_tokenizer(chat, chat_template=CHATML)
    return SimpleNamespace(root=root, base=base, chat=chat)


def adapter_weights(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_every_format_trains_the_same_adapter(models, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = labelled_rows(40, seed=0)
    sources = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows), "parquet": tmp_path / "d.parquet"}
    pq.write_table(pa.Table.from_pylist(rows), sources["parquet"])
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    sources["datasets"] = tmp_path / "saved"
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label", "id"])
        writer.writeheader()
        writer.writerows(rows)
    sources["csv"] = tmp_path / "d.csv"
    trained = {}
    for name, data in sources.items():
        out = tmp_path / f"out-{name}"
        args = ["train", "--model", models.base, "--data", data, "--output", out, "--method", "lora"]
        args += ["--max-steps", 3, "--batch-size", 4, "--val-split", 0.2, "--eval-every", 0, "--lr", 1e-2]
        assert main([str(a) for a in args]) == 0
        trained[name] = adapter_weights(out)
        report = json.loads((out / "eval_report.json").read_text())
        held_out = {label: round(0.2 * n) for label, n in Counter(r["label"] for r in rows).items()}
        assert {k: v["support"] for k, v in report["per_class"].items()} == held_out
    for name, weights in trained.items():
        assert weights.keys() == trained["jsonl"].keys(), name
        assert all(torch.equal(weights[k], trained["jsonl"][k]) for k in weights), name


def test_instruction_schemas_from_datasets_and_parquet_train_as_jsonl_does(models, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    colours = ["red", "blue", "green", "pink", "gold", "gray"]
    chats = [
        [{"role": "user", "content": f"Repeat {c}."}, {"role": "assistant", "content": f"{c} {c}"}] for c in colours
    ]
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in chats])
    sharegpt = [
        {"conversations": [{"from": "human", "value": q["content"]}, {"from": "gpt", "value": a["content"]}]}
        for q, a in chats
    ]
    datasets.Dataset.from_list(sharegpt).save_to_disk(tmp_path / "sharegpt")
    alpaca = [{"instruction": f"Repeat {c}.", "input": None, "output": f"{c} {c}"} for c in colours[:3]]
    pq.write_table(pa.Table.from_pylist(alpaca), tmp_path / "val.parquet")
    write_jsonl(tmp_path / "val.jsonl", [{"messages": c} for c in chats[:3]])

    reports, weights = [], []
    for data, val in (("chats.jsonl", "val.jsonl"), ("sharegpt", "val.parquet")):
        out = tmp_path / f"out-{data}"
        args = ["train", "--task", "instruct", "--model", models.chat, "--data", tmp_path / data, "--val-data"]
        args += [tmp_path / val, "--output", out, "--method", "lora", "--max-steps", 2, "--batch-size", 2]
        assert main([str(a) for a in args]) == 0
        report = json.loads((out / "eval_report.json").read_text())
        report.pop("memory")  # the process's memory, which differs from run to run
        reports.append(report)
        weights.append(adapter_weights(out))
    assert reports[0] == reports[1] and reports[0]["examples"] == 3
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def hf_response_loss(base, adapter, conversations):
    """Mean cross-entropy of the response tokens under transformers + PEFT (labels from nibble's chat masking)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nibble.data.instruct import IGNORE_INDEX, encode_conversation
    from nibble.io.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(adapter)  # it carries the chat template training used
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    total, count = 0.0, 0
    for messages in conversations:
        ids, labels = encode_conversation(tokenizer, messages)
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
        for t in range(len(ids) - 1):
            if labels[t + 1] != IGNORE_INDEX:
                total -= float(logprobs[t, labels[t + 1]])
                count += 1
    return total / count, count


@pytest.mark.cpu_bf16
def test_columns_chat_template_and_eval_on_instruction_data(models, tmp_path, capsys):
    rows = [{"question": f"Repeat {c}.", "answer": f"{c} {c} {c}"} for c in ["red", "blue", "green", "pink"] * 3]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    write_jsonl(tmp_path / "qa_val.jsonl", rows[:4])
    template = tmp_path / "template.jinja"
    template.write_text(INJECTS_SYSTEM)
    out = tmp_path / "out"
    columns = "prompt=question,response=answer"
    args = ["train", "--task", "instruct", "--model", models.chat, "--data", tmp_path / "qa.jsonl", "--output", out]
    args += ["--val-data", tmp_path / "qa_val.jsonl", "--columns", columns, "--chat-template", template]
    args += ["--method", "lora", "--max-steps", 6, "--batch-size", 4, "--lr", 1e-2, "--lora-targets", "all-linear"]
    args += ["--dtype", "float32"]  # eval of the adapter is compared with transformers + PEFT in fp32
    assert main([str(a) for a in args]) == 0
    printed = capsys.readouterr().out
    assert f"chat template: {template} (instead of the model's)" in printed
    assert "get the template's default one ('You are a helpful assistant.')" in printed
    adapter = out / "adapter"
    assert (adapter / "chat_template.jinja").read_text() == INJECTS_SYSTEM
    assert json.loads((adapter / "nibble.json").read_text())["columns"] == columns

    # eval reads the data as training did (columns and template from the adapter) and scores the responses
    # exactly as transformers + PEFT do; the report equals training's last evaluation.
    evaluate = ["eval", "--model", models.chat, "--adapter", adapter, "--data", tmp_path / "qa_val.jsonl"]
    assert main([str(a) for a in [*evaluate, "--output", tmp_path / "eval.json"]]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert f"loss {metrics['loss']:.4f}  perplexity" in printed
    conversations = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
                     for r in rows[:4]]  # fmt: skip
    reference, tokens = hf_response_loss(models.chat, adapter, conversations)
    assert metrics["tokens"] == tokens and metrics["loss"] == pytest.approx(reference, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(torch.tensor(reference).exp().item(), rel=1e-5)
    trained = json.loads((out / "eval_report.json").read_text())
    assert trained["loss"] == pytest.approx(metrics["loss"], rel=1e-5)

    # The base model scores on the same data with --task instruct (a baseline the adapter beats).
    base = ["eval", "--model", models.chat, "--task", "instruct", "--data", tmp_path / "qa_val.jsonl"]
    base += ["--columns", columns, "--chat-template", template, "--output", tmp_path / "base.json"]
    assert main([str(a) for a in base]) == 0
    assert json.loads((tmp_path / "base.json").read_text())["loss"] > metrics["loss"]
    assert main(["eval", "--model", str(models.chat), "--data", str(tmp_path / "qa_val.jsonl")]) == 2
    assert "or --task instruct to score a base model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--columns", "prompt=question"], "columns: map both 'prompt' and 'response'"),
        (["--chat-template", "vicuna"], "--chat-template vicuna: no such file and not a built-in template"),
        (["--task", "classify", "--columns", "prompt=q,response=a"], "'columns' applies to task instruct only"),
    ],
)
def test_bad_instruction_options_are_one_line(models, tmp_path, capsys, extra, message):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "b"}])
    args = ["train", "--task", "instruct", "--model", models.chat, "--data", tmp_path / "qa.jsonl"]
    assert main([str(a) for a in [*args, "--output", tmp_path / "out", *extra]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_predict_writes_ids_label_names_and_csv(models, tmp_path):
    out = tmp_path / "out"
    train = write_jsonl(tmp_path / "train.jsonl", labelled_rows(60, seed=1))
    args = ["train", "--model", models.base, "--data", train, "--output", out, "--method", "lora", "--max-steps", 2]
    assert main([str(a) for a in [*args, "--val-split", 0]]) == 0
    rows = labelled_rows(7, seed=2)
    new = write_jsonl(tmp_path / "new.jsonl", [{"uid": 100 + i, **r} for i, r in enumerate(rows)])
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"text": r["text"]} for r in rows])

    def predict(data, output, *extra):
        argv = ["predict", "--model", models.base, "--adapter", out / "adapter", "--data", data, "--output", output]
        assert main([str(a) for a in [*argv, *extra]]) == 0
        return output

    jsonl = [json.loads(line) for line in predict(new, tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["id"] for p in jsonl] == [r["id"] for r in rows]  # the rows' own id column
    assert all(list(p["probs"]) == ["neg", "pos", "zero"] for p in jsonl)
    assert all(p["label"] == max(p["probs"], key=p["probs"].get) for p in jsonl)
    assert all(sum(p["probs"].values()) == pytest.approx(1.0) for p in jsonl)

    with open(predict(new, tmp_path / "p.csv", "--id-column", "uid"), newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["uid", "label", "prob_neg", "prob_pos", "prob_zero"]
    assert [int(r[0]) for r in table[1:]] == [100 + i for i in range(7)]
    assert [r[1] for r in table[1:]] == [p["label"] for p in jsonl]
    assert [[float(x) for x in r[2:]] for r in table[1:]] == [list(p["probs"].values()) for p in jsonl]

    numbered = [json.loads(line) for line in predict(bare, tmp_path / "b.jsonl").read_text().splitlines()]
    assert [p["row"] for p in numbered] == list(range(7)) and [p["probs"] for p in numbered] == [
        p["probs"] for p in jsonl
    ]
    assert main(["predict", "--model", str(models.base), "--adapter", str(out / "adapter"), "--data", str(bare),
                 "--output", str(tmp_path / "x.jsonl"), "--id-column", "uid"]) == 2  # fmt: skip
    assert not (tmp_path / "x.jsonl").exists()


# Trains on the small file, then sets RLIMIT_DATA (heap and private mappings; the memory-mapped token cache is
# a shared file mapping and does not count) to what the process holds plus HEADROOM, trains on the big file
# under it, and finally shows that the big file itself does not fit.
UNDER_LIMIT = """
import resource, sys
from nibble.cli.main import main

def data_bytes():
    return int([line for line in open("/proc/self/status") if line.startswith("VmData")][0].split()[1]) * 1024

headroom, small, big, *args = sys.argv[1:]
assert main(["train", "--data", small, "--output", small + ".out", *args]) == 0
limit = data_bytes() + int(headroom)
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
print("TRAINED", main(["train", "--data", big, "--output", big + ".out", *args]), flush=True)
try:
    held = open(big).read()
    print("HELD THE FILE")
except MemoryError:
    print("CANNOT HOLD THE FILE")
"""
HEADROOM = 12 * 2**20


@pytest.mark.cpu_bf16
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_file_larger_than_the_process_may_hold_trains_under_a_memory_limit(tmp_path, dtype):
    """Token ids stream into the on-disk cache and are read back memory-mapped, so the heap stays flat. Long
    texts of a whole-word vocabulary keep tokenizing fast while the file grows past the headroom. In bf16 on a
    native-bf16 CPU under the limit, matmuls run on fp32 units with oneDNN off (its kernels crashed the process)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    base, _ = helpers.make_hf_checkpoint(tmp_path / "base", "qwen3")
    words = {"neg": ["bad" * 300, "awful" * 180], "pos": ["good" * 220, "great" * 180]}
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2} | {w: 3 + i for i, w in enumerate(sum(words.values(), []))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("|", "removed")
    tokenizer.save(str(base / "tokenizer.json"))
    (base / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "<eos>"}))
    rng = random.Random(0)
    for name, n in (("small.jsonl", 400), ("big.jsonl", 4600)):
        with open(tmp_path / name, "w") as f:
            for i in range(n):
                label = sorted(words)[i % 2]
                f.write(
                    json.dumps({"text": "|".join(rng.choice(words[label]) for _ in range(4)), "label": label}) + "\n"
                )
    assert (tmp_path / "big.jsonl").stat().st_size > 1.25 * HEADROOM

    args = ["--model", base, "--max-steps", 2, "--batch-size", 4, "--max-seq-len", 16, "--eval-every", 0]
    args += ["--save-every", 0, "--method", "lora", "--val-split", 0.01, "--dtype", dtype]
    command = [sys.executable, "-c", UNDER_LIMIT, HEADROOM, tmp_path / "small.jsonl", tmp_path / "big.jsonl", *args]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TRAINED 0" in result.stdout and "CANNOT HOLD THE FILE" in result.stdout, result.stdout[-2000:]
    assert ("runs under a memory limit: bf16 matmuls run on fp32 units" in result.stderr) == (dtype == "bfloat16")
    assert "train: 4554 rows, 46 val rows, 2 labels" in result.stdout  # the split and the label map, streamed
    report = json.loads((tmp_path / "big.jsonl.out" / "eval_report.json").read_text())
    assert {k: v["support"] for k, v in report["per_class"].items()} == {"neg": 23, "pos": 23}
