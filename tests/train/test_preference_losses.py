"""Every ``--loss`` of ``--task preference`` against TRL on the same tiny model, adapter and batch: the loss and the
gradient of every LoRA weight equal TRL's loss code (CPOTrainer.cpo_loss for sigmoid/cDPO, hinge, ipo and simpo;
ORPOTrainer.odds_ratio_loss plus the chosen NLL for orpo; DPOTrainer's robust formula written out) fed by
log-probabilities from transformers + PEFT. And the reference (adapters off) equals the base model loaded alone."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nibble.data.preference import PairData, Truncation, UnpairedData
from nibble.data.ragged import Ragged
from nibble.model import load_model
from nibble.model.adapter import load_adapted
from nibble.train.tasks.kto import KTOObjective
from nibble.train.tasks.preference import Objective, reference_logps, sequence_logps
from peft_adapters import save_peft_adapter

PROMPTS = [[5, 9, 12, 7], [3, 4], [8, 8, 1, 2, 6, 11]]
CHOSEN = [[20, 21, 22], [30, 31, 32, 33, 34], [40]]
REJECTED = [[23, 24], [35], [41, 42, 43, 44]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import helpers

    root = tmp_path_factory.mktemp("pref")
    base, hf = helpers.make_hf_checkpoint(root / "base", "qwen3")
    peft_model = save_peft_adapter(hf, root / "adapter", targets=("q_proj", "v_proj", "down_proj"))
    ours, _ = load_adapted(base, root / "adapter")
    for name, p in ours.named_parameters():
        p.requires_grad_("lora_" in name)
    data = PairData(
        Ragged.from_lists(PROMPTS),
        Ragged.from_lists(CHOSEN),
        Ragged.from_lists(REJECTED),
        np.zeros(3, np.float32),
        np.arange(1, 4),
        Truncation(max_seq_len=64),
    )
    return SimpleNamespace(base=base, peft=peft_model, ours=ours.train(), batch=data.collate([0, 1, 2], pad_id=0))


def hf_logps(model, prompts, completions):
    """Summed log-probs of each completion under a transformers (PEFT) model, one sequence at a time."""
    out, counts = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = torch.tensor([prompt + completion])
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # [T-1, V]
        targets = ids[0, len(prompt) :]
        out.append(logp[len(prompt) - 1 :].gather(1, targets[:, None]).sum())
        counts.append(len(completion))
    return torch.stack(out), torch.tensor(counts, dtype=torch.float32)


def trl_loss(loss_type, beta, label_smoothing, gamma, pc, pr, rc, rr, nc, nr):
    """TRL's own loss code on the sequence log-probs (pc/pr policy, rc/rr reference; nc/nr completion tokens)."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    trainer = SimpleNamespace(
        beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma, loss_type=loss_type, alpha=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )  # fmt: skip
    if loss_type in ("sigmoid", "hinge"):  # DPO: CPO's loss on the log-ratios is DPO's
        return CPOTrainer.cpo_loss(trainer, pc - rc, pr - rr)[0].mean()
    if loss_type == "ipo":  # TRL's DPO normalizes IPO's log-ratios by the completion's tokens
        return CPOTrainer.cpo_loss(trainer, (pc - rc) / nc, (pr - rr) / nr)[0].mean()
    if loss_type == "simpo":
        return CPOTrainer.cpo_loss(trainer, pc / nc, pr / nr)[0].mean()
    if loss_type == "orpo":
        nll = -pc.sum() / nc.sum()  # cross-entropy over the chosen completions' tokens
        return nll - ORPOTrainer.odds_ratio_loss(trainer, pc / nc, pr / nr)[0].mean()
    # robust: DPOTrainer._compute_loss's formula
    delta = (pc - rc) - (pr - rr)
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
    flipped = -label_smoothing * F.logsigmoid(-beta * delta)
    return ((clean - flipped) / (1 - 2 * label_smoothing)).mean()


def lora_grads(model, prefix=""):
    """{nibble parameter name: gradient} of the LoRA weights (PEFT's names mapped to nibble's)."""
    grads = {}
    for name, p in model.named_parameters():
        if "lora_" in name and p.grad is not None:
            grads[name.removeprefix(prefix).replace(".default", "")] = p.grad.clone()
            p.grad = None
    return grads


def assert_grads_close(ours: dict, theirs: dict) -> None:
    """Every LoRA gradient equal to the reference's: fp32, summed in another order (packed vs padded rows)."""
    assert ours.keys() == theirs.keys() and len(ours) == 12
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=5e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


CASES = [
    ("sigmoid", 0.1, 0.0),
    ("sigmoid", 0.5, 0.2),  # conservative DPO
    ("hinge", 0.3, 0.0),
    ("ipo", 0.1, 0.0),
    ("robust", 0.2, 0.1),
    ("simpo", 2.0, 0.0),
    ("simpo", 2.5, 0.1),
    ("orpo", 0.1, 0.0),
]


@pytest.mark.parametrize("loss,beta,smoothing", CASES)
def test_loss_and_gradients_equal_trl(setup, loss, beta, smoothing):
    objective = Objective(loss, beta, smoothing, simpo_gamma=0.7)
    objective.check()
    ours_loss, metrics = objective.batch_loss(objective.forward(setup.ours, setup.batch), setup.batch)
    ours_loss.backward()
    ours = lora_grads(setup.ours)

    peft = setup.peft
    pc, nc = hf_logps(peft, PROMPTS, CHOSEN)
    pr, nr = hf_logps(peft, PROMPTS, REJECTED)
    with torch.no_grad(), peft.disable_adapter():
        rc, _ = hf_logps(peft, PROMPTS, CHOSEN)
        rr, _ = hf_logps(peft, PROMPTS, REJECTED)
    theirs_loss = trl_loss(loss, beta, smoothing, 0.7, pc, pr, rc, rr, nc, nr)
    theirs_loss.backward()
    theirs = lora_grads(peft, "base_model.model.")

    torch.testing.assert_close(ours_loss, theirs_loss.float(), atol=1e-5, rtol=1e-5)
    assert_grads_close(ours, theirs)
    # TRL's reward metrics: beta x log-ratio (simpo, orpo: beta x mean token log-prob)
    reward_c = beta * (pc / nc if loss in ("simpo", "orpo") else pc - rc)
    reward_r = beta * (pr / nr if loss in ("simpo", "orpo") else pr - rr)
    torch.testing.assert_close(metrics["rewards/chosen"], reward_c.mean().detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(metrics["rewards/margins"], (reward_c - reward_r).mean().detach(), atol=1e-6, rtol=1e-5)
    assert metrics["rewards/accuracies"] == (reward_c > reward_r).float().mean()
    torch.testing.assert_close(metrics["logps/rejected"], pr.mean().detach(), atol=1e-5, rtol=1e-5)


def test_reference_with_adapters_off_equals_the_base_loaded_alone(setup):
    base = load_model(setup.base)
    with torch.no_grad():
        alone = sequence_logps(base, setup.batch)
        adapted = sequence_logps(setup.ours, setup.batch)
    reference = reference_logps(setup.ours, setup.batch)
    assert torch.equal(reference, alone)
    assert not reference.requires_grad
    assert not torch.allclose(adapted, alone, atol=1e-3)  # the adapter does change the log-probs
    hf_chosen, _ = hf_logps(load_model_hf(setup.base), PROMPTS, CHOSEN)
    torch.testing.assert_close(reference[:3], hf_chosen.detach(), atol=1e-5, rtol=1e-5)


def load_model_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_precomputed_reference_log_probs_are_used_as_given(setup):
    batch = {**setup.batch, "ref_logps": torch.arange(6, dtype=torch.float32)}
    assert torch.equal(reference_logps(setup.ours, batch), batch["ref_logps"])


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.5)])
def test_kto_loss_and_gradients_equal_the_paper_formula(setup, weights):
    """Eq. 7 of Ethayarajh et al. 2024 as TRL's KTOTrainer computes it, on transformers + PEFT log-probs."""
    completions = CHOSEN
    labels = [True, False, True]
    data = UnpairedData(
        Ragged.from_lists(PROMPTS), Ragged.from_lists(completions), np.array(labels, np.uint8), np.arange(1, 4),
        Truncation(max_seq_len=64),
    )  # fmt: skip
    batch = data.collate([0, 1, 2], pad_id=0)
    objective = KTOObjective(0.2, *weights)
    ours_loss, metrics = objective.batch_loss(objective.forward(setup.ours, batch), batch)
    ours_loss.backward()
    ours = lora_grads(setup.ours)

    peft = setup.peft
    mismatched = [completions[-1], *completions[:-1]]  # row i's prompt with row i - 1's completion
    policy, _ = hf_logps(peft, PROMPTS, completions)
    with torch.no_grad():
        kl_policy, _ = hf_logps(peft, PROMPTS, mismatched)
        with peft.disable_adapter():
            ref, _ = hf_logps(peft, PROMPTS, completions)
            kl_ref, _ = hf_logps(peft, PROMPTS, mismatched)
    kl = (kl_policy - kl_ref).mean().clamp(min=0)
    logratio = policy - ref
    desirable = torch.tensor(labels)
    chosen = weights[0] * (1 - torch.sigmoid(0.2 * (logratio[desirable] - kl)))
    rejected = weights[1] * (1 - torch.sigmoid(0.2 * (kl - logratio[~desirable])))
    theirs_loss = torch.cat([chosen, rejected]).mean()
    theirs_loss.backward()
    theirs = lora_grads(peft, "base_model.model.")

    torch.testing.assert_close(ours_loss, theirs_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(metrics["kl"], kl, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(metrics["rewards/rejected"], 0.2 * logratio[~desirable].mean().detach())
    assert_grads_close(ours, theirs)


def test_the_planner_counts_both_sequences_of_a_pair(setup):
    from nibble.model.config import ModelConfig
    from nibble.train.config import TrainConfig
    from nibble.train.planning import plan_options

    model = ModelConfig.from_hf(setup.base)
    for task, sequences in (("preference", 2), ("reward", 2), ("kto", 1), ("instruct", 1)):
        config = TrainConfig(task=task, batch_size=3, dtype="float32")
        assert plan_options(config, model, num_labels=None, device=torch.device("cpu")).batch_size == 3 * sequences
    # the run's own batches: a pair's tokens are both its sequences' (what BatchStream.most_tokens reads)
    data = PairData(Ragged.from_lists(PROMPTS), Ragged.from_lists(CHOSEN), Ragged.from_lists(REJECTED),
                    np.zeros(3, np.float32), np.arange(1, 4), Truncation(max_seq_len=7))  # fmt: skip
    mask = data.collate([0, 1, 2], pad_id=0)["attention_mask"]
    assert data.lengths().tolist() == (mask[:3].sum(1) + mask[3:].sum(1)).tolist()


@pytest.mark.parametrize("loss,beta,smoothing", [("sigmoid", 0.1, 0.0), ("hinge", 0.3, 0.0), ("ipo", 0.1, 0.0),
                                                 ("robust", 0.2, 0.1)])  # fmt: skip
def test_dpo_losses_and_gradients_equal_trl_dpo_trainers_compute_loss(setup, tmp_path, loss, beta, smoothing):
    """TRL's own DPOTrainer (its tokenization, collator and compute_loss) on string rows, with a random PEFT
    adapter it made itself (its reference: the adapter off): our loss and LoRA gradients on the same rows, with that
    adapter loaded, equal its."""
    import json

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from nibble.data.preference import load_pairs
    from nibble.io.tokenizer import load_tokenizer

    rows = [
        {"prompt": "3+4=", "chosen": "7", "rejected": "8"},
        {"prompt": "Say hi.", "chosen": " Hello there!", "rejected": " No."},
        {"prompt": "Capital of France: ", "chosen": "Paris", "rejected": "Lyon, I think"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(setup.base / "tokenizer.json"), eos_token="<eos>",
                                  pad_token="<pad>")  # fmt: skip
    config = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=[loss], beta=beta, label_smoothing=smoothing,
                       report_to=[], use_cpu=True, per_device_train_batch_size=3)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")  # fmt: skip
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(setup.base, dtype=torch.float32)
    trainer = DPOTrainer(model=hf, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora)  # fmt: skip
    trainer.model.save_pretrained(str(tmp_path / "adapter"))
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    theirs_loss = trainer.compute_loss(trainer.model, batch)
    theirs_loss.backward()
    theirs = lora_grads(trainer.model, "base_model.model.")
    ours_model, _ = load_adapted(setup.base, tmp_path / "adapter")
    for name, p in ours_model.named_parameters():
        p.requires_grad_("lora_" in name)

    data = load_pairs(path, load_tokenizer(setup.base), Truncation(1024))
    ours_batch = data.collate([0, 1, 2], pad_id=0)
    objective = Objective(loss, beta, smoothing)
    ours_loss, metrics = objective.batch_loss(objective.forward(ours_model.train(), ours_batch), ours_batch)
    ours_loss.backward()
    ours = lora_grads(ours_model)
    assert metrics["rewards/margins"].abs() > 1e-3  # the adapter is not the reference
    torch.testing.assert_close(ours_loss, theirs_loss.detach().float(), atol=1e-5, rtol=1e-5)
    assert ours.keys() == theirs.keys() and len(ours) == 8
    for name in ours:  # (float noise of two implementations: within 1e-5 of the gradient's own scale)
        scale = float(theirs[name].abs().max())
        torch.testing.assert_close(
            ours[name], theirs[name], atol=1e-5 * scale, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(loss="hinge", label_smoothing=0.1), "'label_smoothing' applies to loss sigmoid, robust and simpo"),
        (dict(loss="sigmoid", simpo_gamma=1.0), "'simpo_gamma' applies to loss simpo only"),
        (dict(loss="orpo", precompute_reference=True), "loss orpo has no reference"),
        (dict(loss="robust", label_smoothing=0.5), "'label_smoothing' must be in [0, 0.5)"),
        (dict(method="full"), "needs --precompute-reference"),
        (dict(task="kto", loss="ipo"), "'loss' applies to task preference only"),
        (dict(task="reward", beta=0.2), "'beta' applies to the preference, kto and grpo tasks only"),
    ],
)
def test_bad_preference_settings_are_one_line_naming_the_key(settings, message):
    from nibble.errors import NibbleError
    from nibble.train.config import TrainConfig

    with pytest.raises(NibbleError) as err:
        TrainConfig(**{"task": "preference", **settings}).validate(required=())
    assert message in str(err.value)
