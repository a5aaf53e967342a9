"""Preference tuning (azllm dpo): pairs read in TRL's forms, the losses, stored reference
log-probs, learning on held-out pairs, exact resume after a kill, one-line errors."""

import json
import math
import re

import pytest
import torch
from conftest import (
    SAMPLE,
    assert_resumed_after,
    kill_after_checkpoint,
    mark_logged_steps,
    run_cli,
)
from test_cli_errors import fails

from azllm.chat.dpo import (
    REFERENCE_FILE,
    DPOLoss,
    DPOSettings,
    dpo,
    preference_loss,
    sequence_logps,
    stored_reference,
)
from azllm.chat.pairdata import PairBatches, load_pairs, to_pair
from azllm.checkpoint import load_run
from azllm.errors import AzllmError
from azllm.metrics import read_metrics

PROMPT = [{"role": "user", "content": "Bakı haradadır?"}]
GOOD, BAD = "Bakı Xəzər dənizinin sahilindədir.", "Bilmirəm."


def _sentences(lo=5, hi=12):
    out = []
    for f in sorted(SAMPLE.glob("*.txt")):
        for s in re.split(r"(?<=[.!?])\s+", f.read_text(encoding="utf-8")):
            if lo <= len(s.split()) <= hi:
                out.append(s.split())
    return out


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Pairs that differ clearly: a sentence of the bundled corpus (chosen) against the same
    words in reverse order (rejected); the prompt is its first two words."""
    f = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [
        {"prompt": " ".join(w[:2]), "chosen": " ".join(w), "rejected": " ".join(w[::-1])}
        for w in _sentences()[:300]
    ]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return f


FP32 = {"train.precision": "fp32"}


def test_the_three_pair_forms_read_alike_and_only_the_completion_is_trained(tok, tokenizer_path):
    chosen = [{"role": "assistant", "content": GOOD}]
    rejected = [{"role": "assistant", "content": BAD}]
    explicit = {"prompt": PROMPT, "chosen": chosen, "rejected": rejected}
    forms = [
        explicit,
        {"prompt": PROMPT[0]["content"], "chosen": GOOD, "rejected": BAD},
        {"messages": PROMPT, "chosen": GOOD, "rejected": BAD},
        {"chosen": PROMPT + chosen, "rejected": PROMPT + rejected},  # implicit prompt
    ]
    assert all(to_pair(r, "x") == (PROMPT, chosen, rejected) for r in forms)
    # a multi-turn prompt: its earlier assistant turn is context, never trained
    prompt = [*PROMPT, {"role": "assistant", "content": "Bəli?"}, PROMPT[0]]
    data = PairBatches([(prompt, chosen, rejected)], tok, tokenizer_path, 128, 0, 0.0)
    b = data.batch("train", 0, 1)
    assert b.inputs.shape[:2] == (1, 2) and b.ref_logps is None
    for side, text in enumerate((GOOD, BAD)):
        trained = [t for t in b.targets[0, side].tolist() if t != -1]
        assert trained == tok.encode(text) + [tok.end_id]
        ids = tok.encode_chat(prompt + [{"role": "assistant", "content": text}])[0]
        assert b.inputs[0, side, : len(ids) - 1].tolist() == ids[:-1]


def test_losses_at_the_reference_and_against_their_definitions():
    counts = torch.tensor([[4, 8], [5, 5]])
    ref = torch.tensor([[-10.0, -12.0], [-7.0, -9.0]])
    s = DPOSettings(beta=0.1)
    # policy == reference: every implicit reward is 0 -> log 2, a coin flip, no margin
    loss, st = preference_loss(ref.clone(), ref, counts, s)
    assert loss.item() == pytest.approx(math.log(2))
    assert st["reward_acc"].item() == 0.5 and st["margin"].item() == 0.0
    ipo, _ = preference_loss(ref.clone(), ref, counts, DPOSettings("ipo", beta=0.1))
    assert ipo.item() == pytest.approx((1 / (2 * 0.1)) ** 2)  # (0 - 1/(2 beta))^2
    # chosen up by 2 nats, rejected down by 1 in the first pair, the second unchanged
    policy = ref + torch.tensor([[2.0, -1.0], [0.0, 0.0]])
    loss, st = preference_loss(policy, ref, counts, s)
    want = (-math.log(1 / (1 + math.exp(-0.1 * 3))) + math.log(2)) / 2
    assert loss.item() == pytest.approx(want)
    assert st["reward_acc"].item() == 0.75 and st["margin"].item() == pytest.approx(0.15)
    # cDPO: with label smoothing the optimum is a finite margin, so pushing a right pair
    # further can raise the loss; robust DPO with eps 0 is plain DPO
    far = ref + torch.tensor([[200.0, -200.0], [200.0, -200.0]])
    smooth = DPOSettings(label_smoothing=0.2)
    assert (
        preference_loss(far, ref, counts, smooth)[0]
        > preference_loss(policy, ref, counts, smooth)[0]
    )
    robust0 = preference_loss(policy, ref, counts, DPOSettings("robust"))[0]
    assert robust0.item() == pytest.approx(loss.item())
    # SimPO needs no reference and compares per-token means: 1 nat/token on 4 tokens vs 8
    simpo = DPOSettings("simpo", beta=2.0, gamma_ratio=0.5)
    pol = torch.tensor([[-4.0, -16.0], [-5.0, -5.0]])
    loss, st = preference_loss(pol, None, counts, simpo)
    h = [2.0 * (-1 + 2) - 1.0, 2.0 * 0 - 1.0]
    assert loss.item() == pytest.approx(sum(math.log1p(math.exp(-x)) for x in h) / 2)
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss(pol, None, counts, s)


def test_stored_reference_logps_equal_a_live_reference_model(tiny_run, pairs_file, tmp_path):
    model, tok, cfg = load_run(tiny_run)
    data = PairBatches(load_pairs([pairs_file]), tok, tiny_run / "tokenizer.json", 128, 0)
    out = tmp_path / "dpo"
    ref = stored_reference(
        out, data, tiny_run / "model.safetensors", cfg, "fp32", torch.device("cpu"), say=str
    )
    assert (out / REFERENCE_FILE).exists()
    for split in ("train", "val"):
        # the live model, one pair at a time (the store ran cfg.train.micro_batch at a time)
        live = torch.cat(
            [sequence_logps(model, data.take(split, [i]))[0] for i in range(data.count(split))]
        )
        # measured: identical (max |difference| 0.0) on a CPU, on sums of about -175 nats;
        # 1e-3 leaves room for kernels whose fp32 rounding depends on the batch, and is far
        # below what one changed token moves (nats)
        torch.testing.assert_close(ref[split], live.detach(), rtol=0, atol=1e-3)
    # the same data and weights: read back, not recomputed
    import azllm.chat.dpo as dpo_mod

    def never(*a, **k):
        raise AssertionError("recomputed")

    orig, dpo_mod.reference_logps = dpo_mod.reference_logps, never
    try:
        again = stored_reference(
            out, data, tiny_run / "model.safetensors", cfg, "fp32", torch.device("cpu"), str
        )
        assert all(torch.equal(again[s], ref[s]) for s in ref)
        # other data (one pair fewer): another key, so computed afresh
        fewer = PairBatches(load_pairs([pairs_file])[1:], tok, tiny_run / "tokenizer.json", 128, 0)
        with pytest.raises(AssertionError, match="recomputed"):
            stored_reference(
                out, fewer, tiny_run / "model.safetensors", cfg, "fp32", torch.device("cpu"), str
            )
    finally:
        dpo_mod.reference_logps = orig


def _held_out(run, base_run, pairs_file, settings):
    """(DPO loss, reward accuracy) of run's weights over every held-out pair."""
    model, tok, cfg = load_run(run)
    data = PairBatches(
        load_pairs([pairs_file]), tok, base_run / "tokenizer.json", 128, cfg.train.seed
    )
    base = load_run(base_run)[0]
    data.set_reference(
        {
            s: sequence_logps(base, data.take(s, list(range(data.count(s)))))[0].detach()
            for s in ("train", "val")
        }
    )
    with torch.no_grad():
        loss, st = DPOLoss(settings)(model, data.take("val", list(range(data.count("val")))))
    return loss.item(), st["reward_acc"].item(), data.count("val")


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_dpo_lowers_held_out_loss_and_raises_reward_accuracy(tiny_run, pairs_file, tmp_path, loss):
    settings = DPOSettings(loss, beta=2.0 if loss == "simpo" else 0.1)
    out = tmp_path / "dpo"
    last = dpo(
        tiny_run,
        [pairs_file],
        out,
        settings,
        overrides={**FP32, "train.lr": 5e-4, "train.eval_interval": 20},
        epochs=1,
        progress=False,
    )
    before = _held_out(tiny_run, tiny_run, pairs_file, settings)
    after_loss, after_acc, n = _held_out(out, tiny_run, pairs_file, settings)
    assert after_loss < before[0] - 0.1
    # above chance by more than 3 standard errors of a coin flip over n held-out pairs
    assert after_acc > 0.5 + 3 * math.sqrt(0.25 / n)
    if loss == "sigmoid":
        assert before[1] == 0.5  # the SFT model against itself: every pair a tie
    # the loop logged the held-out statistics and drew them
    vals = [r for r in read_metrics(out) if "val_reward_acc" in r]
    assert vals and {"val_margin", "val_chosen_logp", "val_rejected_logp"} <= set(vals[-1])
    assert last["val_reward_acc"] == vals[-1]["val_reward_acc"] > 0.5
    from PIL import Image

    # three panels: loss, held-out reward accuracy, held-out log-probs (one panel: 400 px)
    assert Image.open(out / "loss.png").size[1] > 800
    assert (out / REFERENCE_FILE).exists() == (loss != "simpo")


def _dpo_args(tiny_run, pairs_file):
    return [
        "--run",
        tiny_run,
        "--data",
        pairs_file,
        "--precision",
        "fp32",
        "--lr",
        "5e-4",
        "--log-interval",
        "1",
        "--max-steps",
        "120",
        "--ckpt-interval",
        "10",
        "--eval-interval",
        "40",
    ]


def test_exact_resume_after_a_real_kill(tiny_run, pairs_file, tmp_path):
    args = _dpo_args(tiny_run, pairs_file)
    ref = tmp_path / "ref"
    run_cli("dpo", *args, "--out", ref)
    run = tmp_path / "killed"
    killed_at = kill_after_checkpoint(["dpo", *args, "--out", run], run, 30)
    assert killed_at < 120
    mark_logged_steps(run, killed_at)
    stored = (run / REFERENCE_FILE).stat().st_mtime_ns
    run_cli("dpo", *args, "--out", run, "--resume")
    assert (run / REFERENCE_FILE).stat().st_mtime_ns == stored  # reused, not recomputed
    assert_resumed_after(run, killed_at, 120)

    def losses(r):
        return [(x["step"], x["loss"]) for x in read_metrics(r) if "loss" in x]

    def vals(r):
        keep = ("step", "val_loss", "val_reward_acc", "val_margin")
        return [{k: x[k] for k in keep} for x in read_metrics(r) if "val_loss" in x]

    assert losses(run) == losses(ref)  # bit for bit, steps redone after the kill included
    assert vals(run) == vals(ref)
    # a resume with another loss setting is refused
    fails(
        "dpo",
        *args,
        "--out",
        run,
        "--resume",
        "--beta",
        "0.5",
        "--max-steps",
        "130",
        match="resume with the same --loss",
    )


def test_bad_pairs_are_one_line_errors_with_file_and_line(tiny_run, tmp_path):
    good = json.dumps({"prompt": "Salam", "chosen": GOOD, "rejected": BAD}, ensure_ascii=False)
    f = tmp_path / "pairs.jsonl"
    out = tmp_path / "out"
    f.write_text(good + "\n" + json.dumps({"prompt": "Salam", "rejected": BAD}) + "\n")
    fails("dpo", "--run", tiny_run, "--data", f, "--out", out, match=f'{f}:2: no "chosen"')
    same = json.dumps({"prompt": "Salam", "chosen": GOOD, "rejected": GOOD}, ensure_ascii=False)
    f.write_text(good + "\n\n" + same + "\n")
    fails(
        "dpo",
        "--run",
        tiny_run,
        "--data",
        f,
        "--out",
        out,
        match=f"{f}:3: chosen and rejected are identical",
    )
    bad_role = {"prompt": "Salam", "chosen": [{"role": "user", "content": "x"}], "rejected": BAD}
    f.write_text(json.dumps(bad_role) + "\n")
    fails("dpo", "--run", tiny_run, "--data", f, "--out", out, match=f'{f}:1: "chosen" must be')
    f.write_text(good + "\n")
    fails("dpo", "--run", tiny_run, "--data", f, "--out", out, "--beta", "0", match="--beta")
    assert not out.exists()  # nothing written before the data and settings are checked
    with pytest.raises(AzllmError, match="label-smoothing"):
        DPOSettings(label_smoothing=0.5).check()
