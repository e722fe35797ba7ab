"""``nibble export``: a model and its adapter merged into a GGUF file, with a quantization report; or the adapter
alone as a llama.cpp LoRA file.

The report says, per ggml type, which tensors were written in it and what they weigh, and what the
chosen quantization costs: the perplexity of the exported file (read back in its own blocks, the weights
llama.cpp computes with; dequantized through a temporary conversion for the MoE and hybrid Qwen layouts)
against the float merged model, on held-out text. That text is, in order of preference: ``--eval-data``
(instruction JSONL, scored on the response tokens as training scores them, or plain text), the validation
data of the run the adapter came from (its ``config.yaml``: ``val_data``, or the same seeded split of
``data``), or the sample text shipped with nibble.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from nibble.data.batching import Dataset
from nibble.data.instruct import IGNORE_INDEX, collate_lm, read_instruct
from nibble.errors import NibbleError
from nibble.io.files import writable_parent, write_text_atomic
from nibble.io.gguf import NATIVE_ARCHITECTURES, convert_gguf, is_gguf, open_gguf
from nibble.io.tokenizer import Tokenizer, load_tokenizer
from nibble.model.adapter import check_base, check_gguf_base, load_adapted, read_adapter_info
from nibble.model.config import ModelConfig
from nibble.model.export import ExportResult, export_adapter, export_model
from nibble.model.loading import load_model, resolve_model_dir
from nibble.nn.quant_linear import cache_budget_bytes, cache_dense_weights
from nibble.quant import QuantSpec
from nibble.train.config import TrainConfig, read_yaml
from nibble.train.tasks import get_task
from nibble.train.tasks.lm import evaluate_lm

SAMPLE_TEXT = "sample_text.txt"
EVAL_SEQ_LEN = 512
EVAL_BATCH = 4


class TextWindows:
    """A plain text as consecutive windows of ``EVAL_SEQ_LEN`` tokens, every token a target (a ``Dataset``)."""

    def __init__(self, windows: Sequence[Sequence[int]]):
        self.windows = [list(w) for w in windows if len(w) > 1]

    @classmethod
    def of(cls, tokenizer: Tokenizer, text: str) -> TextWindows:
        ids = tokenizer.encode(text)
        return cls([ids[i : i + EVAL_SEQ_LEN] for i in range(0, len(ids), EVAL_SEQ_LEN)])

    def __len__(self) -> int:
        return len(self.windows)

    def subset(self, indices: Sequence[int]) -> TextWindows:
        return TextWindows([self.windows[i] for i in indices])

    def collate(self, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        rows = [self.windows[i] for i in indices]
        return collate_lm(rows, rows, pad_id)


def _run_validation(adapter: Path, tokenizer: Tokenizer) -> tuple[Dataset, str] | None:
    """The validation rows of the run ``adapter`` came from (its ``config.yaml``), as its task holds them out;
    None when no run's config.yaml lies beside the adapter, or its task does not import here, has no LM text to
    hold out or held none.

    Raises:
        NibbleError: the run's config.yaml is unreadable, or the data file it records is gone.
    """
    config_file = adapter.parent / "config.yaml"
    if not config_file.is_file():
        return None
    config = TrainConfig(**read_yaml(config_file))
    try:
        task = get_task(config.task)
    except NibbleError:  # a task of the user's own that is not importable here: the next source of text
        return None
    held_out = getattr(task, "held_out", None)
    return held_out(config, tokenizer) if held_out is not None else None


def eval_texts(
    tokenizer: Tokenizer, eval_data: str | Path | None, adapter: Path | None, max_tokens: int
) -> tuple[Dataset, str]:
    """The held-out text the report scores (see the module doc): its first examples holding about
    ``max_tokens`` target tokens, and where it came from.

    Raises:
        NibbleError: an ``eval_data`` file that is missing or malformed.
    """
    found = None
    if eval_data is not None:
        path = Path(eval_data)
        if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
            found = read_instruct(path, tokenizer), str(path)
        elif path.is_file():
            found = TextWindows.of(tokenizer, path.read_text(encoding="utf-8")), str(path)
        else:
            raise NibbleError(f"{path}: no such file; --eval-data takes instruction .jsonl or a plain text file")
    if found is None and adapter is not None:
        found = _run_validation(adapter, tokenizer)
    if found is None:
        text = resources.files("nibble.data").joinpath(SAMPLE_TEXT).read_text(encoding="utf-8")
        found = TextWindows.of(tokenizer, text), f"nibble's sample text ({SAMPLE_TEXT})"
    data, source = found
    keep, total = 0, 0
    while keep < len(data) and total < max_tokens:
        labels = data.collate([keep], 0)["labels"]
        total += int((labels[:, 1:] != IGNORE_INDEX).sum())
        keep += 1
    return data.subset(range(keep)), source


def _base_config(model: str | Path) -> ModelConfig:
    """The base's config, read without converting a .gguf file."""
    if is_gguf(model):
        return ModelConfig.from_hf(open_gguf(model).config)
    return ModelConfig.from_hf(resolve_model_dir(model))


def export_gguf(
    model: str | Path,
    output: str | Path,
    *,
    quant: str = "f16",
    adapter: str | Path | None = None,
    adapter_only: bool = False,
    eval_data: str | Path | None = None,
    eval_tokens: int = 2048,
    overwrite: bool = False,
    any_base: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export ``model`` (+ ``adapter``) to the GGUF file ``output`` and write the report beside it
    (``<output stem>.report.json``); returns the report. With ``adapter_only`` the adapter alone is written.

    Raises:
        NibbleError: a classification adapter, ``adapter_only`` without an adapter, a bad ``quant``, an
            ``output`` or report that exists (without ``overwrite``), a parent that cannot be written,
            unreadable evaluation data, or anything loading the model and adapter rejects.
    """
    output = Path(output)
    if eval_tokens < 0:
        raise NibbleError(f"--eval-tokens must be >= 0, got {eval_tokens}")
    for path in (output, report_path(output)):
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise NibbleError(f"{path}: already exists; choose another --output or pass --overwrite")
    writable_parent(output)
    info = read_adapter_info(adapter) if adapter is not None else None
    if info is not None and info.task != "causal_lm":
        raise NibbleError(
            f"{info.directory}: a classification adapter; llama.cpp runs causal language models, so it has no GGUF "
            "form (nibble merge writes a transformers checkpoint)"
        )
    report: dict[str, Any] = {"file": str(output), "quant": quant}
    if adapter_only:
        if info is None:
            raise NibbleError("--adapter-only needs --adapter DIR")
        check_gguf_base(info, model)
        if not any_base:
            check_base(info, model)
        result = export_adapter(_base_config(model), info, output, quant, overwrite=overwrite)
        if info.quant is not None and info.quant.format == "gguf":
            base = "the very .gguf file it was trained on"
        else:
            base = f"a GGUF export of its base (nibble export --model {model} --output BASE.gguf)"
        report.update(_describe(result), lora={"rank": info.config["r"], "alpha": info.config["lora_alpha"]})
        report["notes"] = [f"apply it to {base}: llama-cli -m BASE.gguf --lora {output.name}"]
        _save_report(output, report, log)
        return report

    model_dir = resolve_model_dir(model)
    if info is not None:
        merged, _ = load_adapted(model_dir, info.directory, task="causal_lm", any_base=any_base)
        tokenizer = load_tokenizer(info.directory if (info.directory / "tokenizer.json").is_file() else model_dir)
    else:
        merged = load_model(model_dir)
        tokenizer = load_tokenizer(model_dir)
    tokenizer.check_fits(merged.config.vocab_size, model)
    texts, source = eval_texts(tokenizer, eval_data, info.directory if info else None, eval_tokens)
    cache_dense_weights(merged, cache_budget_bytes(merged, torch.float32), torch.float32)
    name = info.directory.parent.name if info is not None else Path(model).stem
    log(f"export: writing {output} ({quant})")
    result = export_model(merged, tokenizer, output, quant, name=name, overwrite=overwrite)
    report.update(_describe(result))
    if eval_tokens > 0 and len(texts):
        log(f"export: perplexity of the float merged model on {source}")
        float_eval = evaluate_lm(merged, texts, EVAL_BATCH, tokenizer.pad_id)
        del merged
        if result.architecture in NATIVE_ARCHITECTURES:
            log("export: perplexity of the exported file, read back in its own blocks")
            export_eval = _evaluate_file(output, texts, tokenizer.pad_id)
        else:  # (no native blocks for these layouts: read through a temporary conversion, removed after)
            log("export: perplexity of the exported file, read back dequantized")
            with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as scratch:
                export_eval = _evaluate_file(convert_gguf(output, Path(scratch) / "model"), texts, tokenizer.pad_id)
        report["perplexity"] = {
            "text": source,
            "tokens": float_eval["tokens"],
            "float": float_eval["perplexity"],
            "exported": export_eval["perplexity"],
            "change": export_eval["perplexity"] / float_eval["perplexity"] - 1.0,
        }
    _save_report(output, report, log)
    return report


def _evaluate_file(path: Path, texts, pad_id: int) -> dict[str, Any]:
    """Perplexity on ``texts`` of the exported model at ``path`` (a .gguf in its own blocks, or a directory)."""
    model = load_model(path, quantize=QuantSpec("gguf") if path.is_file() else None)
    cache_dense_weights(model, cache_budget_bytes(model, torch.float32), torch.float32)
    return evaluate_lm(model, texts, EVAL_BATCH, pad_id)


def _describe(result: ExportResult) -> dict[str, Any]:
    return {
        "architecture": result.architecture,
        "bytes": result.path.stat().st_size,
        "types": result.type_summary(),
        "tensors": {t.name: t.ggml_type for t in result.tensors},
        "fallbacks": [t.name for t in result.tensors if t.fallback],
        "notes": list(result.notes),
    }


def report_path(output: Path) -> Path:
    """Where the report of the export ``output`` goes: ``<stem>.report.json`` beside it."""
    return output.with_name(f"{output.stem}.report.json")


def format_report(report: dict[str, Any]) -> str:
    """The report as the lines ``nibble export`` prints."""
    lines = [
        f"wrote {report['file']} ({report['bytes'] / 1e6:.1f} MB, {report['architecture']}, --quant {report['quant']})"
    ]
    lines.append(f"  {'type':<6}{'tensors':>9}{'params':>14}{'MB':>10}")
    for kind, entry in sorted(report["types"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"  {kind:<6}{entry['tensors']:>9}{entry['params']:>14,}{entry['bytes'] / 1e6:>10.2f}")
    if report["fallbacks"]:
        shown = ", ".join(report["fallbacks"][:3]) + (" ..." if len(report["fallbacks"]) > 3 else "")
        lines.append(f"  {len(report['fallbacks'])} tensors took a fallback type (row length): {shown}")
    ppl = report.get("perplexity")
    if ppl:
        lines.append(
            f"  perplexity on {ppl['text']} ({ppl['tokens']} tokens): float {ppl['float']:.3f} -> exported "
            f"{ppl['exported']:.3f} ({100 * ppl['change']:+.2f}%)"
        )
    lines.extend(f"  note: {note}" for note in report.get("notes", []))
    return "\n".join(lines)


def _save_report(output: Path, report: dict[str, Any], log: Callable[[str], None]) -> None:
    path = report_path(output)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    log(format_report(report))
    log(f"report: {path}")
