"""Loading a bf16 checkpoint with quantize="nf4": time and peak RSS, against transformers + bitsandbytes.

Writes a synthetic Qwen3-shaped bf16 checkpoint (random weights, sharded by layer) to a temporary
directory, then loads it in fresh processes: nibble.load_model(quantize="nf4") and, as the reference,
transformers' from_pretrained with a bitsandbytes NF4 config. Each process reports its resident memory
right after its imports and its peak (VmHWM) after loading; the table shows the peak over the bare import,
wall and CPU seconds (CPU time is the fairer comparison on a busy machine).

Budget (shared/design.md): peak RSS over import <= (NF4 model size + largest fp32 tensor) * 1.2.

    .venv/bin/python benchmarks/bench_load.py --hidden 2048 --layers 16
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9


def rss_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_checkpoint(path: Path, args: argparse.Namespace) -> dict:
    """A random Qwen3-shaped checkpoint in bf16, one shard per layer; returns its config.json dict."""
    import torch

    from nibble.io.safetensors import save_file_atomic
    from nibble.model import ModelConfig
    from nibble.model.memory import projection_shapes

    config = ModelConfig(
        model_type="qwen3",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(args.hidden // 256, 1),
        head_dim=128,
        qk_norm=True,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict) -> None:
        save_file_atomic(tensors, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    h, d = config.hidden_size, config.head_dim
    shard("embed.safetensors", {"model.embed_tokens.weight": rand(config.vocab_size, h)})
    shapes = projection_shapes(config)
    for i in range(config.num_hidden_layers):
        tensors = {}
        for name, (out_f, in_f) in shapes.items():
            group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            tensors[f"model.layers.{i}.{group}.{name}.weight"] = rand(out_f, in_f)
        for norm, size in (("input_layernorm", h), ("post_attention_layernorm", h)):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(size, dtype=torch.bfloat16)
        for norm in ("q_norm", "k_norm"):
            tensors[f"model.layers.{i}.self_attn.{norm}.weight"] = torch.ones(d, dtype=torch.bfloat16)
        shard(f"layer-{i:03d}.safetensors", tensors)
    shard("norm.safetensors", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf = config.to_hf()
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    return hf


def model_bytes(model) -> int:
    """Bytes held by a model's tensors, each storage counted once (tied weights, 4-bit weights included)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    from nibble.nn import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            for t in m.qweight.tensors().values():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def child(loader: str, path: str, dtype_name: str) -> None:
    """Runs in a fresh process: import, load, report JSON on stdout."""
    import torch

    dtype = getattr(torch, dtype_name)
    if loader == "nibble":
        import nibble

        nibble.load_model  # noqa: B018 - the lazy import happens before the baseline is taken
        from nibble.model import loading  # noqa: F401
    else:
        import bitsandbytes  # noqa: F401
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    base = rss_kib("VmRSS")
    cpu_start = time.process_time()
    start = time.perf_counter()
    if loader == "nibble":
        model = nibble.load_model(path, quantize="nf4", dtype=dtype)
        size = model_bytes(model)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, dtype=dtype, device_map="cpu")
        size = model.get_memory_footprint()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    peak = rss_kib("VmHWM")
    print(json.dumps({"seconds": seconds, "cpu": cpu, "base_kib": base, "peak_kib": peak, "model_bytes": size}))


def run_child(loader: str, path: Path, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", loader, str(path), "--dtype", dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=6144)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the dense parts after loading")
    parser.add_argument("--skip-reference", action="store_true", help="do not load with transformers+bitsandbytes")
    parser.add_argument("--child", nargs=2, metavar=("LOADER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.dtype)
        return

    with tempfile.TemporaryDirectory(prefix="nibble-bench-load-") as tmp:
        path = Path(tmp)
        hf = write_checkpoint(path, args)
        disk = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        from nibble.model import ModelConfig
        from nibble.model.memory import projection_shapes

        config = ModelConfig.from_hf(hf)
        params = disk / 2  # every tensor is bf16
        largest = max(
            [config.vocab_size * config.hidden_size] + [math.prod(s) for s in projection_shapes(config).values()]
        )
        results = {"nibble": run_child("nibble", path, args.dtype)}
        if not args.skip_reference:
            results["transformers+bnb"] = run_child("transformers", path, args.dtype)

    nf4_size = results["nibble"]["model_bytes"]
    budget = (nf4_size + 4 * largest) * 1.2
    print(
        f"Qwen3-shaped, hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
        f"{config.num_hidden_layers} layers, vocab {config.vocab_size}, tied embeddings; dense parts in {args.dtype}"
    )
    print(
        f"checkpoint (bf16) {disk / GB:.2f} GB | fp32 model {4 * params / GB:.2f} GB | "
        f"NF4 model {nf4_size / GB:.2f} GB | largest fp32 tensor {4 * largest / GB:.2f} GB | "
        f"budget (NF4 + largest) x 1.2 = {budget / GB:.2f} GB"
    )
    print()
    ref = results.get("transformers+bnb")
    header = (
        f"| {'loader':<18} | {'load s':>7} | {'CPU s':>7} | {'peak RSS over import':>20} | {'model size':>10} "
        f"| {'peak/budget':>11} |"
    )
    if ref:
        header += " CPU s vs ref | RSS vs ref |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, r in results.items():
        over = (r["peak_kib"] - r["base_kib"]) * 1024
        row = (
            f"| {name:<18} | {r['seconds']:>7.1f} | {r['cpu']:>7.1f} | {over / GB:>17.2f} GB "
            f"| {r['model_bytes'] / GB:>7.2f} GB | {over / budget:>11.2f} |"
        )
        if ref:
            ref_over = (ref["peak_kib"] - ref["base_kib"]) * 1024
            row += f" {r['cpu'] / ref['cpu']:>12.2f} | {over / ref_over:>10.2f} |"
        print(row)


if __name__ == "__main__":
    main()
