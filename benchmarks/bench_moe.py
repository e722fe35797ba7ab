"""Mixture-of-experts on CPU: the expert compute alone, and QLoRA training of a Qwen3-MoE-shaped model, in one run.

Expert compute (forward + backward of one layer's experts with LoRA r=8 on every expert, ``--tokens`` tokens routed
top-k by a random router, weights random): nibble's grouped op (``nibble.nn.experts``: assignments sorted by expert
once, one matmul per active expert and projection) with dense fp32 and with NF4 experts, against a per-expert loop
(for every expert: a boolean mask over the tokens, its rows, the matmuls) and against transformers'
``Qwen3MoeSparseMoeBlock``'s experts with PEFT's LoRA on the fused parameters (``target_parameters``). The saved
column is what autograd keeps for the backward (``saved_tensors_hooks``), in MB.

Training (``--layers`` layers of the Qwen3-MoE shape, random weights written by transformers; batches of
``--batch`` x ``--seq`` random tokens, causal LM loss, AdamW): nibble (NF4 attention and experts, LoRA on attention
and experts) against transformers + PEFT + bitsandbytes (``BitsAndBytesConfig`` NF4: bitsandbytes quantizes the
``nn.Linear`` attention projections; the experts are 3-D parameters it leaves in fp32), LoRA on the same targets
(PEFT: ``target_modules`` attention, ``target_parameters`` experts). Each stack trains in its own process
(tokens/s over the steps after the first, peak RSS of the process).

    .venv/bin/python benchmarks/bench_moe.py                              # issue 22's shape, 2 layers
    .venv/bin/python benchmarks/bench_moe.py --layers 8 --steps 4         # the 8-layer model (slow on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from timing import best_of

RANK = 8


def moe_config(args: argparse.Namespace):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.inter,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(args.hidden // 256, 1),
        head_dim=64,
        norm_topk_prob=True,
        max_position_embeddings=4096,
    )


def saved_megabytes(fn, weights: list[torch.Tensor]) -> float:
    """MB of the activations autograd saves while ``fn()`` runs (each storage once; ``weights``' storages left out)."""
    skip = {w.untyped_storage().data_ptr() for w in weights}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def expert_table(args: argparse.Namespace) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from nibble.nn.experts import Experts
    from nibble.quant import quantize_rows

    torch.manual_seed(0)
    e, h, i, k, t = args.experts, args.hidden, args.inter, args.top_k, args.tokens
    gate_up = torch.randn(e, 2 * i, h) * 0.02
    down = torch.randn(e, h, i) * 0.02
    x = torch.randn(t, h)
    index = torch.stack([torch.randperm(e)[:k] for _ in range(t)])  # [T, k]
    weight = torch.rand(t, k).softmax(-1)
    swiglu = lambda g, u: F.silu(g) * u  # noqa: E731

    def nibble_experts(nf4: bool) -> Experts:
        experts = Experts(e, h, i)
        for proj, dense in ((experts.gate_up_proj, gate_up), (experts.down_proj, down)):
            proj.set_weight(quantize_rows(dense.unbind(0), "nf4") if nf4 else dense.clone())
            proj.add_lora(RANK, 16.0)
        return experts

    grouped_dense, grouped_nf4 = nibble_experts(False), nibble_experts(True)

    def grouped(experts):
        def run():
            xi = x.clone().requires_grad_(True)
            experts(xi, index, weight, swiglu).sum().backward()

        return run

    def loop():
        """Every expert in turn: a mask over the tokens, its rows' matmuls (LoRA added), scattered back."""
        experts = grouped_dense
        xi = x.clone().requires_grad_(True)
        out = torch.zeros_like(xi)
        gu, dn = experts.gate_up_proj, experts.down_proj
        for j in range(e):
            token, slot = torch.where(index == j)
            rows = xi[token]
            hgu = rows @ gate_up[j].T + (rows @ gu.lora_A[j].T) @ gu.lora_B[j].T * gu.scaling
            g, u = hgu.chunk(2, dim=-1)
            a = F.silu(g) * u
            y = a @ down[j].T + (a @ dn.lora_A[j].T) @ dn.lora_B[j].T * dn.scaling
            out = out.index_add(0, token, y * weight[token, slot, None])
        out.sum().backward()

    block = Qwen3MoeSparseMoeBlock(moe_config(args))
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(gate_up)
        block.experts.down_proj.copy_(down)
    peft_block = get_peft_model(
        torch.nn.ModuleDict({"mlp": block}),
        LoraConfig(r=RANK, lora_alpha=16, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    )
    experts_hf = peft_block.base_model.model["mlp"].experts

    def transformers_block():
        xi = x.clone().requires_grad_(True)
        experts_hf(xi, index, weight).sum().backward()

    rows = [
        f"Expert compute, forward + backward: {t} tokens, {e} experts, top-{k}, hidden {h}, moe_intermediate {i}, "
        f"LoRA r={RANK} on every expert (best of {args.repeat})",
        "",
        "| implementation | ms | vs transformers+PEFT | saved MB |",
        "|---|---:|---:|---:|",
    ]
    cases = [
        ("nibble grouped, dense fp32 experts", grouped(grouped_dense)),
        ("nibble grouped, NF4 experts", grouped(grouped_nf4)),
        ("per-expert loop (masks), dense fp32", loop),
        ("transformers Qwen3MoeExperts + PEFT target_parameters", transformers_block),
    ]
    times = {name: best_of(fn, args.repeat, warm_up=True) for name, fn in cases}
    weights = [gate_up, down, *grouped_dense.parameters(), *grouped_nf4.parameters(), *peft_block.parameters()]
    saved = {name: saved_megabytes(fn, weights) for name, fn in cases}
    ref = times[cases[-1][0]]
    for name, _ in cases:
        rows.append(f"| {name} | {times[name] * 1e3:.0f} | {ref / times[name]:.2f}x | {saved[name]:.0f} |")
    return rows


def train_child(args: argparse.Namespace) -> None:
    """Train ``args.child`` (nibble or hf) on the checkpoint in ``args.model``; print a JSON result line."""
    torch.manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq)) for _ in range(args.steps)]
    if args.child.startswith("nibble"):
        from nibble.model import load_model
        from nibble.nn.lora import apply_lora
        from nibble.nn.quant_linear import cache_budget_bytes, cache_dense_weights

        model = load_model(args.model, quantize="nf4")
        apply_lora(model, "all-linear", rank=RANK, alpha=16.0, dropout=0.0)
        budget = cache_budget_bytes(model, torch.float32) if args.child == "nibble" else 0  # as nibble train does
        cache_dense_weights(model, budget, torch.float32)
        model.train()

        def loss_of(ids):
            logits = model(ids)
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=torch.float32)
        config = LoraConfig(
            r=RANK,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        )
        model = get_peft_model(model, config)
        model.train()

        def loss_of(ids):
            return model(input_ids=ids, labels=ids).loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for ids in batches:
        start = time.perf_counter()
        loss_of(ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    timed = times[1:] or times
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    trainable = sum(p.numel() for p in params)
    tokens = args.batch * args.seq
    print(json.dumps({"tokens_per_s": tokens * len(timed) / sum(timed), "peak_rss_gb": rss, "trainable": trainable}))


def train_table(args: argparse.Namespace) -> list[str]:
    from transformers import Qwen3MoeForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        Qwen3MoeForCausalLM(moe_config(args)).save_pretrained(tmp)
        results = {}
        for stack in ("nibble", "nibble-nocache", "hf"):
            argv = [sys.executable, __file__, "--child", stack, "--model", tmp] + [
                f"--{k}={getattr(args, k)}"
                for k in (
                    "experts",
                    "top_k",
                    "hidden",
                    "inter",
                    "layers",
                    "vocab",
                    "seq",
                    "batch",
                    "steps",
                )  # fmt: skip
            ]
            argv = [a.replace("--top_k", "--top-k") for a in argv]
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            results[stack] = json.loads(done.stdout.strip().splitlines()[-1])
    r = results["hf"]
    names = {
        "nibble": "nibble (NF4 attention + experts, dense copies by its CPU default)",
        "nibble-nocache": "nibble (NF4, no dense copies: --cache-budget-mb 0)",
        "hf": "transformers + PEFT + bnb (NF4 attention, fp32 experts)",
    }
    return [
        f"QLoRA training, Qwen3-MoE shape: {args.layers} layers, {args.experts} experts top-{args.top_k}, hidden "
        f"{args.hidden}, moe_intermediate {args.inter}, vocab {args.vocab}; {args.batch} x {args.seq} tokens, "
        f"{args.steps} steps (first left out), LoRA r={RANK} on attention + experts",
        "",
        "| stack | tokens/s | vs transformers | peak RSS GB | vs transformers | trainable |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {names[s]} | {v['tokens_per_s']:.1f} | {v['tokens_per_s'] / r['tokens_per_s']:.2f}x | "
            f"{v['peak_rss_gb']:.2f} | {v['peak_rss_gb'] / r['peak_rss_gb']:.2f}x | {v['trainable']:,} |"
            for s, v in results.items()
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the expert-compute table")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--child", choices=("nibble", "nibble-nocache", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        train_child(args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n".join(expert_table(args)))
    if not args.skip_train:
        print()
        print("\n".join(train_table(args)))


if __name__ == "__main__":
    main()
