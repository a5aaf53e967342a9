"""Do the tests catch a broken core? Apply deliberate breakages one at a time and run the tests
that should notice each.

    .venv/bin/python bench/mutants.py                    # every mutant (~20 min on 2 cores)
    .venv/bin/python bench/mutants.py --only rope-sign --only kv-cache-positions
    .venv/bin/python bench/mutants.py --list             # names, files and tests, runs nothing

Each mutant is a source-text replacement (file, old snippet, new snippet) and the tests to run
for it. The repository is copied to a temporary folder (../shared is linked beside the copy, as
the tests expect) and every mutant is applied to the copy, tested with `pytest -x -q`, and
undone: the checkout itself is never modified. A mutant is caught when its tests fail.
Every snippet must occur exactly once in the current source; otherwise the script stops before
running anything, so a refactor that moves the code is noticed rather than silently tested
against the unbroken original. The last line is `caught C/L`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


M = Mutant
MUTANTS = [
    # ---- model: attention, positions, cache, loss -------------------------------------------
    M("causal-off", "azllm/model.py",
      "is_causal=mask is None,", "is_causal=False,",
      ("tests/test_model.py::test_future_tokens_cannot_change_past_logits",)),
    M("padding-visible", "azllm/model.py",
      "mask = causal[None] & valid_keys[:, None, :]",
      "mask = causal[None] & torch.ones_like(valid_keys)[:, None, :]",
      ("tests/test_model.py::test_greedy_with_and_without_cache_is_identical",
       "tests/test_chat_engine.py::test_batched_greedy_equals_each_prompt_alone")),
    M("rope-sign", "azllm/model.py",
      "rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)",
      "rotated = torch.cat([x[..., half:], -x[..., :half]], dim=-1)",
      ("tests/test_export_hf.py::test_logits_equal_ours_on_a_padded_batch",)),
    M("kv-cache-positions", "azllm/model.py",
      "cache.next_pos += real.long().sum(1)", "cache.next_pos += t",
      ("tests/test_model.py", "tests/test_chat_engine.py")),
    M("packed-rows-see-each-other", "azllm/model.py",
      "return ar - first, (same & (ar[None, :] <= ar[:, None]))[:, None]",
      "return ar - first, ((same | True) & (ar[None, :] <= ar[:, None]))[:, None]",
      ("tests/test_model.py::test_packed_sequences_see_only_themselves",)),
    M("chunked-ce-mean-over-all", "azllm/model.py",
      "return total / (targets != -1).sum().clamp(min=1)", "return total / targets.numel()",
      ("tests/test_model.py::test_chunked_cross_entropy_matches_the_plain_loss_and_gradients",)),
    # ---- chat data: loss mask -----------------------------------------------------------------
    M("loss-mask-widened", "azllm/tokenizer.py",
      "mask += [False] + [trained] * len(content) + [trained]",
      "mask += [False] + [True] * len(content) + [trained]",
      ("tests/test_chat_sft.py::test_loss_mask_covers_exactly_the_assistant_tokens",)),
    # ---- shards -------------------------------------------------------------------------------
    M("shards-split-rule", "azllm/shards.py",
      'split = hint or ("val" if in_val(text.encode("utf-8"), val_fraction) else "train")',
      'split = "val" if in_val(text.encode("utf-8"), val_fraction) else "train"',
      ("tests/test_shards.py", "tests/test_corpus_pipeline.py")),
    # ---- evaluation ---------------------------------------------------------------------------
    M("eval-windows-overlap", "azllm/evaluate/text.py",
      "windows = [ids[s : s + ctx + 1] for s in range(0, len(ids) - 1, ctx)]",
      "windows = [ids[s : s + ctx + 1] for s in range(0, len(ids) - 1, ctx - 1)]",
      ("tests/test_evaluate.py",)),
    # ---- corpus -------------------------------------------------------------------------------
    M("corpus-stop-signal-ignored", "azllm/corpus/pipeline.py",
      "        raise _Terminated()", "        pass",
      ("tests/test_corpus_pipeline.py::test_interrupted_run_leaves_no_output",)),
    # ---- memory plan --------------------------------------------------------------------------
    M("plan-adam-one-moment", "azllm/memory.py",
      "return per * (2 * (p.total - muon) + muon)", "return per * ((p.total - muon) + muon)",
      ("tests/test_plan.py::test_az100m_at_1024_fp16_fits_a_4gb_card_under_3_8gb",)),
    # ---- checkpoints --------------------------------------------------------------------------
    M("ckpt-optimizer-state-dropped", "azllm/checkpoint.py",
      '    if scaler is not None and scaler.is_enabled() and trainer["scaler"]:',
      '    optimizer.state.clear()\n'
      '    if scaler is not None and scaler.is_enabled() and trainer["scaler"]:',
      ("tests/test_train.py::test_exact_resume_after_a_real_kill",)),
    M("ckpt-rng-not-restored", "azllm/checkpoint.py",
      'torch.set_rng_state(trainer["rng_cpu"])', "pass",
      ("tests/test_train.py::test_resume_restores_optimizer_and_rng_state",)),
    M("ckpt-scaler-not-restored", "azllm/checkpoint.py",
      'scaler.load_state_dict(trainer["scaler"])', "pass",
      ("tests/test_train.py::test_checkpoint_restores_the_grad_scaler",)),
    # ---- exports ------------------------------------------------------------------------------
    M("gguf-attn-output-bias-zeroed", "azllm/export/gguf.py",
      '(g + f"attn_output.{s}", t[b + f"attn.o_proj.{s}"]),',
      '(g + f"attn_output.{s}", t[b + f"attn.o_proj.{s}"] * (s == "weight")),',
      ("tests/test_export_gguf.py::test_f32_logits_equal_ours_at_every_position",)),
    M("gguf-ffn-up-bias-zeroed", "azllm/export/gguf.py",
      '(g + f"ffn_up.{s}", t[b + f"mlp.fc.{s}"]),',
      '(g + f"ffn_up.{s}", t[b + f"mlp.fc.{s}"] * (s == "weight")),',
      ("tests/test_export_gguf.py::test_f32_logits_equal_ours_at_every_position",)),
    M("gguf-k-not-permuted", "azllm/export/gguf.py",
      '(g + "attn_k.weight", rope(t[b + "attn.k_proj.weight"], cfg.kv_heads)),',
      '(g + "attn_k.weight", t[b + "attn.k_proj.weight"]),',
      ("tests/test_export_gguf.py::test_f32_logits_equal_ours_at_every_position",)),
    M("gguf-untied-head-dropped", "azllm/export/gguf.py",
      "if not cfg.tie_embeddings:  # tied", "if False:  # tied",
      ("tests/test_export_gguf.py::test_f32_logits_equal_ours_at_every_position",)),
    M("hf-transpose-dropped", "azllm/export/hf.py",
      'out[h + "attn.c_proj.weight"] = ours[b + "attn.o_proj.weight"].T',
      'out[h + "attn.c_proj.weight"] = ours[b + "attn.o_proj.weight"]',
      ("tests/test_export_hf.py",)),
    M("ollama-template-end-dropped", "azllm/export/ollama.py",
      '{{ .Content }}" + END + "{{ end }}"', '{{ .Content }}" + "{{ end }}"',
      ("tests/test_export_ollama.py",)),
    M("ollama-template-lowercase-field", "azllm/export/ollama.py",
      "<|{{ .Role }}|>", "<|{{ .role }}|>",
      ("tests/test_export_ollama.py",)),
    # ---- sampling (generate.sample_next, shared by generate() and the chat engine) ------------
    M("top-k-off-by-one", "azllm/generate.py",
      "ks = [min(s.top_k, vocab) for s in rows]",
      "ks = [min(s.top_k + 1, vocab) if s.top_k else 0 for s in rows]",
      ("tests/test_generate.py::test_sampled_frequencies_match_each_rows_settings",
       "tests/test_chat_engine.py::test_each_row_keeps_its_own_sampling_params")),
    M("top-p-ignored", "azllm/generate.py",
      "if any(p < 1 for p in ps):", "if False:",
      ("tests/test_generate.py::test_sampled_frequencies_match_each_rows_settings",
       "tests/test_chat_engine.py::test_each_row_keeps_its_own_sampling_params")),
    M("top-p-drops-the-crossing-token", "azllm/generate.py",
      "drop = (probs.cumsum(-1) - probs) >= _per_row(ps, dev)",
      "drop = probs.cumsum(-1) >= _per_row(ps, dev)",
      ("tests/test_generate.py::test_sampled_frequencies_match_each_rows_settings",)),
    # ---- chat engine --------------------------------------------------------------------------
    M("engine-stop-token-emitted", "azllm/chat/engine.py",
      "            if t in req.stop_ids:\n                self._finish(req, \"stop\")\n"
      "                continue\n",
      "            if t in req.stop_ids:\n                self._finish(req, \"stop\")\n",
      ("tests/test_chat_engine.py::test_stop_ids_end_a_row_without_the_stop_token",)),
    M("engine-stop-ids-ignored", "azllm/chat/engine.py",
      "if t in req.stop_ids:", "if False:",
      ("tests/test_chat_engine.py::test_stop_ids_end_a_row_without_the_stop_token",)),
    M("engine-length-off-by-one", "azllm/chat/engine.py",
      "if req.generated >= req.max_tokens:", "if req.generated > req.max_tokens:",
      ("tests/test_chat_engine.py",)),
    # ---- the training step -------------------------------------------------------------------
    M("step-loss-not-averaged", "azllm/step.py",
      "                loss = loss / self.grad_accum\n", "",
      ("tests/test_step.py",)),
    M("step-no-clip", "azllm/step.py",
      "grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)",
      "grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float('inf'))",
      ("tests/test_step.py",)),
    M("step-grads-not-zeroed", "azllm/step.py",
      "        self.optimizer.zero_grad(set_to_none=True)\n", "",
      ("tests/test_step.py",)),
    M("step-lr-ignored", "azllm/step.py",
      'group["lr"] = lr * group.get("lr_scale", 1.0)', 'group["lr"] = group["lr"]',
      ("tests/test_step.py",)),
    # ---- training loop ------------------------------------------------------------------------
    M("resume-loaded-step-zero", "azllm/train.py",
      'start, best_val = state["step"], state["best_val_loss"]',
      'start, best_val = 0, state["best_val_loss"]',
      ("tests/test_train.py::test_exact_resume_after_a_real_kill",)),
    M("plan-muon-states-as-adamw", "azllm/memory.py",
      'muon = p.block_matrices if optimizer == "muon" else 0', "muon = 0",
      ("tests/test_plan.py::test_cli_optimizer_muon_counts_one_state_per_block_matrix",)),
    # ---- web chat page: the reply is drawn as it streams ----------------------------------------
    M("web-page-draws-reply-once", "azllm/chat/web.py",
      "reply;\n            $(\"log\").scrollTop = $(\"log\").scrollHeight;\n          }\n"
      "          if (choice.finish_reason) finish = choice.finish_reason;",
      "out.textContent;\n            $(\"log\").scrollTop = $(\"log\").scrollHeight;\n          }\n"
      "          if (choice.finish_reason) { finish = choice.finish_reason; "
      "out.textContent = reply; }",
      ("tests/test_chat_web.py::test_a_typed_message_gets_a_streamed_reply",)),
    M("resume-loaded-step-zero-fsdp", "azllm/train.py",
      'start, best_val = state["step"], state["best_val_loss"]',
      'start, best_val = 0, state["best_val_loss"]',
      ("tests/test_train.py::test_fsdp_matches_one_process_and_checkpoints_reshard",)),
    M("resume-loaded-step-zero-sft", "azllm/train.py",
      'start, best_val = state["step"], state["best_val_loss"]',
      'start, best_val = 0, state["best_val_loss"]',
      ("tests/test_chat_sft.py::test_sft_resume_continues_after_the_checkpoint",)),
    M("best-weights-every-eval", "azllm/train.py",
      "if val < best_val:", "if True:",
      ("tests/test_train.py::test_best_weights_are_the_lowest_validation_step_and_load_with_weights_best",)),
    M("resume-accepts-other-config", "azllm/train.py",
      "if given.resolved() != saved.model.resolved():", "if False:",
      ("tests/test_train.py::test_resume_refuses_a_different_model_config",)),
]  # fmt: skip


def check_snippets(root: Path, mutants: list[Mutant]) -> list[str]:
    """Problems (missing or ambiguous snippets); empty when every mutant can be applied."""
    problems = []
    for m in mutants:
        path = root / m.file
        if not path.exists():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        n = path.read_text(encoding="utf-8").count(m.old)
        if n != 1:
            problems.append(f"{m.name}: snippet found {n} times in {m.file}: {m.old!r}")
    return problems


def copy_repo(src: Path, dest: Path) -> Path:
    """The working tree without the venv, git data and caches; ../shared linked beside it."""
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"
    )
    shutil.copytree(src, dest / src.name, ignore=ignore, symlinks=True)
    shared = src.parent / "shared"
    if shared.exists():
        (dest / "shared").symlink_to(shared.resolve())
    return dest / src.name


def run_mutant(m: Mutant, copy: Path, timeout: float) -> tuple[str, float, str]:
    """('caught'|'missed'|'error', seconds, last lines of pytest's output)."""
    path = copy / m.file
    original = path.read_text(encoding="utf-8")
    path.write_text(original.replace(m.old, m.new), encoding="utf-8")
    t0 = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
            cwd=copy,  # the copy's azllm shadows the editable install (cwd comes first)
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        out = (proc.stdout + proc.stderr).strip().splitlines()
        # pytest: 0 all passed, 1 some failed; anything else (no tests, usage) is our error
        verdict = {0: "missed", 1: "caught"}.get(proc.returncode, "error")
    except subprocess.TimeoutExpired:
        out, verdict = [f"timed out after {timeout:.0f} s"], "caught"  # a hang is noticed too
    finally:
        path.write_text(original, encoding="utf-8")
    failed = [ln for ln in out if ln.startswith(("FAILED", "ERROR"))]
    return verdict, time.time() - t0, (failed or out[-1:] or [""])[0][:160]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[], help="mutant name (repeatable)")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--repo", type=Path, default=REPO, help="tree to copy (default: this one)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
    args = ap.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.only if n not in by_name]
    if unknown:
        print(f"error: unknown mutant(s) {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    chosen = [by_name[n] for n in args.only] if args.only else MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name:32} {m.file:24} {' '.join(m.tests)}")
        return 0
    problems = check_snippets(args.repo, chosen)
    if problems:
        print("error: the source moved; update these mutants:", *problems, sep="\n  ")
        return 2
    caught = 0
    with tempfile.TemporaryDirectory(prefix="azllm-mutants-") as tmp:
        copy = copy_repo(args.repo.resolve(), Path(tmp))
        for m in chosen:
            verdict, secs, detail = run_mutant(m, copy, args.timeout)
            caught += verdict == "caught"
            print(f"{verdict.upper():6} {m.name:32} {secs:6.1f}s  {detail}", flush=True)
    print(f"caught {caught}/{len(chosen)}")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
