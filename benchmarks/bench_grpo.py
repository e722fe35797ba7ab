"""GRPO's sampler against transformers' generate + PEFT: G completions of each prompt with a LoRA adapter unmerged.

Both sides sample ``--prompts`` x ``--generations`` sequences of exactly ``--new-tokens`` tokens (no end token, so
the work is equal) at temperature 1 from the same weights and the same adapter (rank 16 on all linear layers, B
non-zero); the table gives the best-of-N wall time, tokens/s and the ratio, measured in this one run.

    .venv/bin/python benchmarks/bench_grpo.py                        # a random Qwen3 of --hidden / --layers
    .venv/bin/python benchmarks/bench_grpo.py --model smollm2        # the demo model (fetched once)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import nibble  # noqa: E402
from nibble.model.sampler import SamplingConfig, sample  # noqa: E402
from nibble.nn import apply_lora  # noqa: E402
from nibble.nn.lora import lora_layers  # noqa: E402
from timing import best_of  # noqa: E402

RANK, ALPHA = 16, 32.0


def random_checkpoint(directory: Path, hidden: int, layers: int) -> Path:
    import helpers

    heads = max(hidden // 64, 1)
    overrides = dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), head_dim=64,
                     vocab_size=32000)  # fmt: skip
    path, _ = helpers.make_hf_checkpoint(directory, "qwen3", init_std=0.02, **overrides)
    return path


def adapters(path: Path, device: str):
    """nibble's model and transformers + PEFT's, carrying the same LoRA weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ours = nibble.load_model(path, device=device)
    apply_lora(ours, "all-linear", rank=RANK, alpha=ALPHA)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.01)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    theirs = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0))
    state = {}
    for name, layer in lora_layers(ours).items():
        state[f"base_model.model.{name}.lora_A.default.weight"] = layer.lora_A.weight
        state[f"base_model.model.{name}.lora_B.default.weight"] = layer.lora_B.weight
    missing = set(state) - set(theirs.state_dict())
    if missing:
        raise SystemExit(f"PEFT names differ: {sorted(missing)[:3]}")
    theirs.load_state_dict(state, strict=False)
    ids = torch.arange(3, 19)[None].to(device)
    with torch.no_grad():  # the same adapted model on both sides
        torch.testing.assert_close(ours.eval()(ids), theirs.eval()(input_ids=ids).logits, atol=1e-3, rtol=1e-3)
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model directory or 'smollm2' (default: a random Qwen3)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "smollm2":
            from nibble.io.fetch import fetch_smollm2
            from nibble.model.loading import resolve_model_dir

            path = resolve_model_dir(fetch_smollm2())  # the .gguf converted (transformers reads the directory)
        else:
            path = Path(args.model) if args.model else random_checkpoint(Path(tmp) / "model", args.hidden, args.layers)
        ours, theirs = adapters(path, args.device)
        gen = torch.Generator().manual_seed(1)
        prompts = torch.randint(10, 1000, (args.prompts, args.prompt_len), generator=gen)
        config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)

        def nibble_sample() -> None:
            sample(ours, prompts.tolist(), args.generations, config, generator=torch.Generator().manual_seed(2))

        def hf_generate() -> None:
            with torch.no_grad():
                theirs.generate(input_ids=prompts.to(args.device), do_sample=True, temperature=1.0, top_k=0,
                                num_return_sequences=args.generations, max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)  # fmt: skip

        tokens = args.prompts * args.generations * args.new_tokens
        rows = [(name, best_of(fn, args.repeats, warm_up=True)) for name, fn in
                (("nibble sampler", nibble_sample), ("transformers generate + PEFT", hf_generate))]  # fmt: skip
    reference = rows[1][1]
    print(f"{args.prompts} prompts x G={args.generations}, {args.new_tokens} new tokens, {args.device}")
    print(f"{'':32}{'seconds':>10}{'tokens/s':>12}{'vs transformers':>18}")
    for name, seconds in rows:
        print(f"{name:32}{seconds:10.2f}{tokens / seconds:12.1f}{reference / seconds:17.2f}x")


if __name__ == "__main__":
    main()
