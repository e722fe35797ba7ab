"""Opt-in check against llama.cpp itself (not part of the test suite): exported files load and generate there.

llama.cpp comes from ``llama-cpp-python``, built from source into a throwaway virtualenv (about 10 minutes on
2 cores; never the project's own environment)::

    python3 -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install llama-cpp-python
    .venv/bin/python benchmarks/llamacpp_check.py --llama-python /tmp/llamacpp/bin/python

With SmolLM2-135M-Instruct (the demo's Q4_1 GGUF) it

1. exports the model with ``nibble export`` at f16, q8_0 and q4_k;
2. tokenizes a set of strings with nibble and with llama.cpp (the original file and the f16 export);
3. generates greedily from a chat prompt with ``nibble generate``'s code on the original file, and with
   llama.cpp on each export: the f16 text must equal nibble's;
4. trains nothing, but writes a random LoRA adapter for the original file (as ``--quant-format gguf`` would
   train it), exports it with ``--adapter-only`` and compares llama.cpp's logits with the adapter applied at
   run time against nibble's adapted model on the same file;
5. quantizes random weights and the model's own ffn_down weights with ggml's ``ggml_quantize_chunk`` and
   with nibble (Q4_K, Q6_K: nibble's quantizers; Q8_0, Q4_0, Q4_1, Q5_0: the gguf package), comparing bytes.

The llama.cpp side runs in the other interpreter (a subprocess fed JSON); this script runs in nibble's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nibble.io.fetch import fetch_smollm2
from nibble.io.peft import adapter_config, save_adapter
from nibble.io.tokenizer import load_tokenizer
from nibble.model import load_model
from nibble.model.adapter import load_adapted
from nibble.model.generate import generate, prompt_ids
from nibble.model.loading import resolve_model_dir
from nibble.nn import apply_lora
from nibble.nn.quant_linear import cache_dense_weights
from nibble.quant.gguf import quantize_blocks
from nibble.train.gguf_export import export_gguf

STRINGS = [
    "Hello world",
    "numbers 1234567 and 3.14159",
    "  leading spaces,\ttabs\n\nand blank lines",
    "naïve café — Grüße aus Köln, 東京 🤖",
    "<|im_start|>user\nhi<|im_end|>\n",
]
PROMPT = "Name three colours and say one thing about each."
# ggml_type ids (ggml.h)
GGML_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}

LLAMA_SIDE = r"""
import ctypes, glob, json, os, sys
import numpy as np
import llama_cpp

job = json.load(sys.stdin)
out = {}


def load(path, lora=None):
    return llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, logits_all=True, verbose=False, lora_path=lora,
                           seed=0)


for path in job["tokenize"]:
    llm = load(path)
    out.setdefault("tokens", {})[path] = [llm.tokenize(s.encode(), add_bos=False, special=True) for s in job["strings"]]
    del llm
for path in job["generate"]:
    llm = load(path)
    ids = job["prompt_ids"]
    new = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        if token == llm.token_eos() or len(new) >= job["max_new_tokens"]:
            break
        new.append(token)
    out.setdefault("generated", {})[path] = new
    del llm
for base, lora in job.get("lora", []):
    for name, adapter in (("base", None), ("lora", lora)):
        llm = load(base, adapter)
        llm.eval(job["prompt_ids"])
        out.setdefault("logits", {})[f"{name}:{base}"] = np.asarray(llm.scores[: len(job["prompt_ids"])]).tolist()
        del llm
if job.get("quantize"):
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    lib = ctypes.CDLL(glob.glob(os.path.join(libdir, "libggml-base.so*"))[0])
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = np.load(job["quantize"]["weights"]).astype(np.float32)
    rows, cols = x.shape
    for name, type_id in job["quantize"]["types"].items():
        dst = np.zeros(rows * cols * 2, dtype=np.uint8)
        size = lib.ggml_quantize_chunk(type_id, x.ctypes.data, dst.ctypes.data, 0, rows, cols, None)
        np.save(os.path.join(job["quantize"]["dir"], f"ggml-{name}.npy"), dst[:size])
json.dump(out, sys.stdout)
"""


def llama_side(python: str, job: dict) -> dict:
    done = subprocess.run([python, "-c", LLAMA_SIDE], input=json.dumps(job), capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"llama.cpp side failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-python", required=True, help="python of the virtualenv holding llama-cpp-python")
    parser.add_argument("--model", help="a .gguf file (default: the demo's SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", help="directory for the exported files (default: a temporary one)")
    args = parser.parse_args()
    source = Path(args.model) if args.model else fetch_smollm2()
    out = Path(args.out or tempfile.mkdtemp(prefix="nibble-llamacpp-"))
    out.mkdir(parents=True, exist_ok=True)

    exports = {}
    for quant in ("f16", "q8_0", "q4_k"):
        start = time.perf_counter()
        report = export_gguf(
            source, out / f"{source.stem}-{quant}.gguf", quant=quant, overwrite=True, log=lambda s: None
        )
        exports[quant] = (Path(report["file"]), report, time.perf_counter() - start)

    tokenizer = load_tokenizer(resolve_model_dir(source))
    ids = prompt_ids(tokenizer, PROMPT)
    model = load_model(source)
    nibble_new = generate(model, ids, args.max_new_tokens, eos_token_id=tokenizer.eos_id)
    nibble_new = [t for t in nibble_new if t != tokenizer.eos_id]

    # a random adapter on the file's own blocks, exported for that very file
    adapted = load_model(source, quantize="gguf")
    targets = apply_lora(adapted, "all-linear", rank=8, alpha=16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if "lora_B" in name else 0.1))
    adapter_dir = out / "adapter"
    config = adapter_config(
        base_model=str(source),
        targets=sorted({t.rsplit(".", 1)[1] for t in targets}),
        rank=8,
        alpha=16,
        dropout=0.0,
        use_rslora=False,
        task="causal_lm",
    )
    save_adapter(adapted, adapter_dir, config)
    (adapter_dir / "nibble.json").write_text(
        json.dumps(
            {
                "task": "instruct",
                "method": "qlora",
                "quant": {"format": "gguf", "blocksize": 64, "group_size": 128, "double_quant": False},
            }
        )
    )
    lora_file = out / "adapter.gguf"
    export_gguf(
        source, lora_file, adapter=adapter_dir, adapter_only=True, quant="f32", overwrite=True, log=lambda s: None
    )
    # the same base in f32: llama.cpp then multiplies in f32 too (on quantized weights it rounds activations
    # to 8 bits), so the adapter's effect can be compared closely
    base_f32 = out / f"{source.stem}-f32.gguf"
    export_gguf(source, base_f32, quant="f32", eval_tokens=0, overwrite=True, log=lambda s: None)
    ours_adapted, _ = load_adapted(source, adapter_dir)

    # random rows (with an all-zero, an all-positive and an all-negative super-block) and the model's own
    # ffn_down weights of four layers (rows of 1536 values)
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((256, 1536)) * 0.05).astype(np.float32)
    weights[3, :256] = 0.0
    weights[5, :256] = np.abs(weights[5, :256])
    weights[7, :512] = -np.abs(weights[7, :512])
    real = [model.model.layers[i].mlp.down_proj.weight.detach().numpy() for i in range(4)]
    weights = np.concatenate([weights, *real]) if real[0].shape[1] % 256 == 0 else weights
    np.save(out / "weights.npy", weights)
    job = {
        "strings": STRINGS,
        "tokenize": [str(source), str(exports["f16"][0])],
        "generate": [str(p) for p, _, _ in exports.values()],
        "prompt_ids": ids,
        "max_new_tokens": args.max_new_tokens,
        "lora": [[str(source), str(lora_file)], [str(base_f32), str(lora_file)]],
        "quantize": {"weights": str(out / "weights.npy"), "types": GGML_TYPES, "dir": str(out)},
    }
    theirs = llama_side(args.llama_python, job)

    print(f"model: {source.name}; prompt: {PROMPT!r} ({len(ids)} tokens)\n")
    print("| strings tokenized | file | ids equal to nibble's |")
    print("|---|---|---|")
    for path, lists in theirs["tokens"].items():
        ours = [tokenizer.encode(s, add_special_tokens=False) for s in STRINGS]
        equal = sum(a == b for a, b in zip(ours, lists, strict=True))
        print(f"| {len(STRINGS)} | {Path(path).name} | {equal}/{len(STRINGS)} |")

    def common(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    print(
        "\n| export | MB | export s | perplexity change | llama.cpp's greedy tokens equal to nibble generate's on "
        "the source | text equal | ... to nibble's on the exported file |"
    )
    print("|---|---:|---:|---:|---:|---|---:|")
    nibble_text = tokenizer.decode(nibble_new, skip_special_tokens=True)
    for quant, (path, report, seconds) in exports.items():
        got = theirs["generated"][str(path)]
        exported = load_model(path, quantize="gguf")  # the file's own blocks
        cache_dense_weights(exported, 1 << 34, torch.float32)
        on_file = generate(exported, ids, args.max_new_tokens, eos_token_id=tokenizer.eos_id)
        on_file = [t for t in on_file if t != tokenizer.eos_id]
        text = tokenizer.decode(got, skip_special_tokens=True)
        change = report["perplexity"]["change"]
        print(
            f"| {quant} | {report['bytes'] / 1e6:.1f} | {seconds:.1f} | {100 * change:+.2f}% | "
            f"{common(got, nibble_new)}/{len(nibble_new)} | {text == nibble_text} | "
            f"{common(got, on_file)}/{len(on_file)} |"
        )
    print(f"\nnibble generate: {nibble_text!r}")
    print(
        f"llama.cpp (f16): {tokenizer.decode(theirs['generated'][str(exports['f16'][0])], skip_special_tokens=True)!r}"
    )

    with torch.no_grad():
        ours_base = load_model(source, quantize="gguf")(torch.tensor([ids]))[0]
        ours_lora = ours_adapted(torch.tensor([ids]))[0]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    print("\nlogits on the prompt, llama.cpp (adapter GGUF applied at run time) vs nibble (adapted model):")
    print("| base file in llama.cpp | base: relative difference | with LoRA | the LoRA's effect (LoRA - base) |")
    print("|---|---:|---:|---:|")
    for path in (source, base_f32):
        base_l = torch.tensor(theirs["logits"][f"base:{path}"])
        lora_l = torch.tensor(theirs["logits"][f"lora:{path}"])
        effect = rel(lora_l - base_l, ours_lora - ours_base)
        print(f"| {path.name} | {rel(base_l, ours_base):.2e} | {rel(lora_l, ours_lora):.2e} | {effect:.2e} |")
    print(f"(the LoRA moves nibble's logits by {rel(ours_lora, ours_base):.2e} of their norm)")

    print("\n| ggml type | bytes equal to ggml_quantize_chunk | quantizer |")
    print("|---|---|---|")
    for name in GGML_TYPES:
        ggml = np.load(out / f"ggml-{name}.npy")
        ours = quantize_blocks(torch.from_numpy(weights), name).numpy().reshape(-1)
        where = "nibble" if name.endswith("_K") else "gguf package"
        differ = int((ours != ggml).sum()) if ours.shape == ggml.shape else "size"
        print(f"| {name} | {differ == 0} ({differ} of {ggml.size} differ; {weights.shape[0]} rows) | {where} |")


if __name__ == "__main__":
    main()
