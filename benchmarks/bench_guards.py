"""What the input guards cost: opening a GGUF file with nibble's bounded reader vs the gguf package's reader,
rendering a chat template in the bounded sandbox vs jinja2's plain immutable sandbox, and hashing a
checkpoint for its manifest vs writing it.

Run: .venv/bin/python benchmarks/bench_guards.py [--gguf FILE]   (default: the cached SmolLM2 GGUF if present,
else a synthetic file with a 150k-token vocabulary)
Prints markdown tables; ratios compare against a reference measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import torch

from timing import best_of


def traced_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of Python and numpy allocations while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def synthetic_gguf(path: Path, vocab: int = 150_000) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(vocab)])
    writer.add_array("tokenizer.ggml.merges", [f"t o{i}" for i in range(vocab)])
    writer.add_array("tokenizer.ggml.token_type", [1] * vocab)
    writer.add_tensor("token_embd.weight", np.zeros((vocab // 100, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_table(path: Path) -> list[str]:
    import gguf

    from nibble.io.gguf.reader import read_gguf

    def ours():
        file = read_gguf(path)
        return [f.contents() for f in file.fields.values()], file.tensors

    def theirs():
        file = gguf.GGUFReader(path)
        return [f.contents() for f in file.fields.values()], file.tensors

    t_ours, t_theirs = best_of(ours, 3), best_of(theirs, 3)
    m_ours, m_theirs = traced_peak(ours), traced_peak(theirs)
    size = path.stat().st_size
    return [
        f"GGUF file: {path.name} ({size / 2**20:.1f} MiB); open, read every metadata value, view every tensor",
        "",
        "| reader | seconds | peak traced MiB | time ratio | memory ratio |",
        "|---|---:|---:|---:|---:|",
        f"| gguf.GGUFReader | {t_theirs:.2f} | {m_theirs / 2**20:.1f} | 1.00x | 1.00x |",
        f"| nibble read_gguf | {t_ours:.2f} | {m_ours / 2**20:.1f} | {t_ours / t_theirs:.3f}x | "
        f"{m_ours / m_theirs:.3f}x |",
    ]


CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def template_table(renders: int = 2000) -> list[str]:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from nibble.io.chat_template import render

    turn = [
        {"role": "user", "content": "What is the capital of France? " * 5},
        {"role": "assistant", "content": "Paris. " * 20},
    ]
    messages = [{"role": "system", "content": "Be brief."}, *turn * 4]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHATML)
    assert plain.render(messages=messages) == render(CHATML, "bench", messages)

    def ours():
        for _ in range(renders):
            render(CHATML, "bench", messages)

    def theirs():
        for _ in range(renders):
            plain.render(messages=messages)

    t_ours, t_theirs = best_of(ours, 5) / renders, best_of(theirs, 5) / renders
    return [
        f"Chat template: ChatML with a system turn, {len(messages)} messages, {renders} renders (best of 5)",
        "",
        "| sandbox | µs per render | ratio |",
        "|---|---:|---:|",
        f"| jinja2 ImmutableSandboxedEnvironment | {t_theirs * 1e6:.1f} | 1.00x |",
        f"| nibble bounded sandbox | {t_ours * 1e6:.1f} | {t_ours / t_theirs:.2f}x |",
    ]


def manifest_table(megabytes: int = 256) -> list[str]:
    from nibble.io.files import sha256_file
    from nibble.io.safetensors import save_file_atomic

    tensors = {"w": torch.randn(megabytes << 18)}  # float32: 4 bytes each
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "trainable.safetensors"
        t_write = best_of(lambda: save_file_atomic(tensors, path), 3)
        t_hash = best_of(lambda: sha256_file(path), 3)
    return [
        f"Checkpoint manifest: {megabytes} MiB of float32 weights",
        "",
        "| operation | seconds | ratio to the write |",
        "|---|---:|---:|",
        f"| save_file_atomic (write + fsync) | {t_write:.2f} | 1.00x |",
        f"| sha256_file (the manifest's hash) | {t_hash:.2f} | {t_hash / t_write:.2f}x |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="a .gguf file to open (default: SmolLM2 if cached)")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    with tempfile.TemporaryDirectory() as directory:
        path = args.gguf
        if path is None:
            cached = Path.home() / ".cache" / "nibble" / "SmolLM2-135M-Instruct.Q4_1.gguf"
            path = cached if cached.is_file() else synthetic_gguf(Path(directory) / "synthetic.gguf")
        print("\n".join(gguf_table(path)) + "\n")
    print("\n".join(template_table()) + "\n")
    print("\n".join(manifest_table()))


if __name__ == "__main__":
    main()
