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
      "torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)",
      "torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1)",
      ("tests/test_export_hf.py::test_logits_equal_ours_on_a_padded_batch",)),
    M("rope-second-half-table", "azllm/model.py",
      "c, s = cos[..., :half], sin[..., :half]", "c, s = cos[..., half:], sin[..., :half] * 0.5",
      ("tests/test_export_hf.py::test_logits_equal_ours_on_a_padded_batch",)),
    M("rmsnorm-gain-dropped", "azllm/model.py",
      "return self.weight * F.rms_norm(x.float(), (x.size(-1),), None, self.eps).to(x.dtype)",
      "return F.rms_norm(x.float(), (x.size(-1),), None, self.eps).to(x.dtype)",
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
    # ---- task evaluation (issue 14) -------------------------------------------------------------
    M("task-prompt-without-question", "azllm/evaluate/harness.py",
      'return f"{head}Sual: {it.question}\\nCavab:"', 'return f"{head}Sual: \\nCavab:"',
      ("tests/test_eval_tasks.py::test_accuracy_rises_when_the_model_learns_the_task",)),
    M("task-compare-only-first-two", "azllm/cli.py",
      "rows = compare_runs(args.compare)", "rows = compare_runs(args.compare[:2])",
      ("tests/test_eval_tasks.py::test_accuracy_rises_when_the_model_learns_the_task",)),
    M("task-continuations-get-first-context", "azllm/evaluate/backends.py",
      "rc.v[:, q, :, :lc] = cache.v[:, owner[r], :, :lc]",
      "rc.v[:, q, :, :lc] = cache.v[:, owner[0], :, :lc]",
      ("tests/test_eval_tasks.py::test_shared_prefix_scores_equal_one_sequence_at_a_time",)),
    M("task-continuations-get-first-keys", "azllm/evaluate/backends.py",
      "rc.k[:, q, :, :lc] = cache.k[:, owner[r], :, :lc]",
      "rc.k[:, q, :, :lc] = cache.k[:, owner[0], :, :lc]",
      ("tests/test_eval_tasks.py::test_shared_prefix_scores_equal_one_sequence_at_a_time",)),
    M("task-options-read-as-qa", "azllm/evaluate/tasks.py",
      "alias = next((k for k in MC_ALIASES if k in rec), None)", "alias = None",
      ("tests/test_eval_tasks.py::test_bad_records_name_file_line_and_field",)),
    M("task-letter-answer-read-as-qa", "azllm/evaluate/tasks.py",
      'letter = rec.get("answer") if "answers" not in rec else None', "letter = None",
      ("tests/test_eval_tasks.py::test_bad_records_name_file_line_and_field",)),
    M("eval-tasks-every-0-is-the-default", "azllm/cli.py",
      "every = cfg.train.eval_interval if args.eval_tasks_every is None else args.eval_tasks_every",
      "every = args.eval_tasks_every or cfg.train.eval_interval",
      ("tests/test_eval_tasks.py::test_train_logs_task_accuracy_and_plots_it",
       "tests/test_chat_sft.py::test_sft_logs_task_accuracy_in_chat_form")),
    M("sft-eval-tasks-not-in-chat-form", "azllm/cli.py",
      "task_eval=_task_eval(args, _sft_config_for_tasks(args), chat=True),",
      "task_eval=_task_eval(args, _sft_config_for_tasks(args), chat=False),",
      ("tests/test_chat_sft.py::test_sft_logs_task_accuracy_in_chat_form",)),
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
    M("gguf-q4_0-output-at-4-bits", "azllm/export/gguf.py",
      "        return q.Q8_0\n    return q.Q4_0", "        return q.Q4_0\n    return q.Q4_0",
      ("tests/test_export_gguf.py::test_bits_per_byte_close_to_ours",)),
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
    M("muon-stack-one-norm", "azllm/optim.py",
      "torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)", "x.norm()",
      ("tests/test_muon.py::test_stacked_matrices_are_orthogonalised_each_on_its_own",
       "tests/test_muon.py::test_muon_step_on_several_matrices_equals_each_alone")),
    M("sft-keeps-base-optimizer", "azllm/chat/sft.py",
      '    "train.optimizer": "adamw",', "",
      ("tests/test_chat_sft.py::test_sft_length_is_set_in_epochs_unless_steps_are_given",)),
    M("plan-muon-stack-uncounted", "azllm/memory.py",
      "22 * p.muon_stack)", "0 * p.muon_stack)",
      ("tests/test_plan.py::test_muon_step_temporaries_are_what_the_plan_counts",)),
    M("muon-weight-decay-dropped", "azllm/optim.py",
      '            "weight_decay": tc.muon_weight_decay,\n', "",
      ("tests/test_muon.py::test_muon_weight_decay_shrinks_only_the_block_matrices",)),
    M("repeat-dropout-one-step-early", "azllm/train.py",
      "repeats = (step - 1) * tokens_per_step >= train_tokens",
      "repeats = step * tokens_per_step >= train_tokens",
      ("tests/test_repeat_dropout.py::"
       "test_dropout_turns_on_when_the_data_repeats_and_resumes_exactly",)),
    M("set-dropout-skips-attention", "azllm/model.py",
      "            elif isinstance(m, Attention):\n                m.dropout = p\n", "",
      ("tests/test_repeat_dropout.py::"
       "test_repeat_dropout_is_validated_counted_by_the_plan_and_reaches_every_layer",)),
    M("plan-ignores-repeat-dropout", "azllm/memory.py",
      "m, t = cfg.peak_model(), cfg.model.block_size", "m, t = cfg.model, cfg.model.block_size",
      ("tests/test_repeat_dropout.py::"
       "test_repeat_dropout_is_validated_counted_by_the_plan_and_reaches_every_layer",)),
    M("muon-stacks-unbounded", "azllm/optim.py",
      "per = max(1, MUON_STACK_ELEMENTS // same[0].numel())", "per = len(same)",
      ("tests/test_plan.py::test_muon_step_temporaries_are_what_the_plan_counts",)),
    M("plan-muon-states-as-adamw", "azllm/memory.py",
      'muon = p.block_matrices if optimizer == "muon" else 0', "muon = 0",
      ("tests/test_plan.py::test_cli_optimizer_muon_counts_one_state_per_block_matrix",)),
    M("qat-quantizes-moe-router", "azllm/quant.py",
      "        if name in routers:", "        if name in ():",
      ("tests/test_qat.py::test_export_equals_fake_quantized_weights",)),
    M("tune-toml-drops-tables", "azllm/tune/settings.py",
      "    if isinstance(v, dict):  # an inline table (model.rope_scaling)",
      "    if False:",
      ("tests/test_tune.py::test_every_config_field_survives_the_toml_writer",)),
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
    # --resume that loads no checkpoint: retraining from 0 is deterministic, so only the
    # before-resume tags on the metrics rows (conftest.mark_logged_steps) can tell
    *(M(f"resume-loads-nothing{suffix}", "azllm/train.py",
        "    if resume:\n        state = load_checkpoint(",
        "    if False:\n        state = load_checkpoint(", (test,))
      for suffix, test in (
          ("", "tests/test_train.py::test_exact_resume_after_a_real_kill"),
          ("-ddp", "tests/test_train.py::"
                   "test_two_process_ddp_matches_one_process_and_resumes_across_world_sizes"),
          ("-muon", "tests/test_muon.py::test_muon_trains_and_resumes_exactly_after_a_real_kill"),
          ("-muon-fsdp",
           "tests/test_muon.py::test_muon_ddp_and_fsdp_match_one_process_and_reshard"),
          ("-moe",
           "tests/test_moe.py::test_training_logs_the_router_losses_and_resumes_exactly"))),
    M("best-weights-every-eval", "azllm/train.py",
      "if val < best_val:", "if True:",
      ("tests/test_train.py::test_best_weights_are_the_lowest_validation_step_and_load_with_weights_best",)),
    M("resume-accepts-other-config", "azllm/train.py",
      "if given.resolved() != saved.model.resolved():", "if False:",
      ("tests/test_train.py::test_resume_refuses_a_different_model_config",)),
    # ---- preference tuning (chat/dpo.py) ---------------------------------------------------
    M("dpo-trains-prompt-replies", "azllm/chat/pairdata.py",
      "mask = [m and i >= n_prompt for i, m in enumerate(mask)]", "mask = list(mask)",
      ("tests/test_dpo.py::test_the_three_pair_forms_read_alike_and_only_the_completion_is_trained",)),
    M("dpo-reference-ignored", "azllm/chat/dpo.py",
      "logratio = (policy - ref) / per", "logratio = policy / per",
      ("tests/test_dpo.py::test_losses_at_the_reference_and_against_their_definitions",)),
    M("dpo-prefers-rejected", "azllm/chat/dpo.py",
      "h = logratio[:, 0] - logratio[:, 1]", "h = logratio[:, 1] - logratio[:, 0]",
      ("tests/test_dpo.py::test_dpo_lowers_held_out_loss_and_raises_reward_accuracy",)),
    M("cdpo-smoothing-sign", "azllm/chat/dpo.py",
      "- eps * F.logsigmoid(-s.beta * h)", "+ eps * F.logsigmoid(-s.beta * h)",
      ("tests/test_dpo.py::test_losses_at_the_reference_and_against_their_definitions",)),
    M("dpo-reference-key-ignores-data", "azllm/chat/dpo.py",
      'f"{data.digest()}/{file_sha256(weights)}', 'f"{file_sha256(weights)}',
      ("tests/test_dpo.py::test_stored_reference_logps_equal_a_live_reference_model",)),
    M("dpo-tie-counts-as-wrong", "azllm/chat/dpo.py",
      "+ 0.5 * (diff == 0).float()", "+ 0.0 * (diff == 0).float()",
      ("tests/test_dpo.py::test_losses_at_the_reference_and_against_their_definitions",)),
    M("dpo-resume-shuffles-anew", "azllm/chat/pairdata.py",
      'g = step_generator(self.seed, split, f"epoch{epoch}")',
      'g = torch.Generator().manual_seed(int(__import__("time").time_ns() % 2**31))',
      ("tests/test_dpo.py::test_exact_resume_after_a_real_kill",)),
    M("dpo-identical-pair-accepted", "azllm/chat/pairdata.py",
      "    if chosen == rejected:", "    if False:",
      ("tests/test_dpo.py::test_bad_pairs_are_one_line_errors_with_file_and_line",)),
    M("pairs-similarity-filter-off", "azllm/chat/pairs.py",
      "if sim >= max_similarity:", "if sim > 1:",
      ("tests/test_pairs.py::test_samples_as_close_as_the_reference_are_dropped",)),
    M("pairs-sample-as-chosen", "azllm/chat/pairs.py",
      '"chosen": [{"role": "assistant", "content": reference}]',
      '"chosen": [{"role": "assistant", "content": text}]',
      ("tests/test_pairs.py::test_pairs_on_the_az_chat_set_are_read_back_by_dpo",)),
    # ---- QAT: llama.cpp CPU emulation ---------------------------------------------------------
    M("qat-act-q8_0-off", "azllm/quant.py",
      "        m.act_q8_0 = True", "        m.act_q8_0 = False",
      ("tests/test_qat.py::test_llama_cpp_logits_equal_our_emulated_model",)),
    M("qat-kv-not-f16", "azllm/quant.py",
      "    q, k, v = _f16(q), _f16(k), _f16(v)", "    pass",
      ("tests/test_qat.py::test_llama_cpp_logits_equal_our_emulated_model",)),
    M("qat-act-round-half-away", "azllm/quant.py",
      "torch.round(b * inv)", "_roundf(b * inv)",
      ("tests/test_qat.py::test_quantize_act_q8_0_rounds_as_llama_cpp_x86",)),
    M("qat-gelu-not-f16", "azllm/quant.py",
      "        if func is F.gelu:", "        if False:",
      ("tests/test_qat.py::test_llama_cpp_logits_equal_our_emulated_model[gpt2-q8_0]",)),
    # ---- import of Hugging Face models, LoRA ----------------------------------------------------
    M("import-ignores-rope-theta", "azllm/hf_import.py",
      'return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))', "return 10000.0",
      ("tests/test_import_hf.py::test_import_logits_match_transformers",)),
    M("import-drops-qkv-bias", "azllm/model.py",
      "qkv_bias = bias or cfg.qkv_bias", "qkv_bias = bias",
      ("tests/test_import_hf.py::test_import_logits_match_transformers",)),
    M("hf-export-drops-qkv-bias", "azllm/export/hf.py",
      'for p in ("q_proj", "k_proj", "v_proj") if cfg.qkv_bias else ():',
      'for p in ("q_proj", "k_proj", "v_proj") if False else ():',
      ("tests/test_import_hf.py::test_imported_run_exports_back_to_hf",)),
    M("foreign-chat-end-untrained", "azllm/tokenizer.py",
      "mask += [False] * len(pre) + [trained] * (len(content) + len(suf))",
      "mask += [False] * len(pre) + [trained] * len(content) + [False] * len(suf)",
      ("tests/test_import_hf.py::test_import_logits_match_transformers",)),
    M("lora-scale-ignored", "azllm/lora.py",
      "m.lora_scaling = alpha / rank", "m.lora_scaling = 1.0",
      ("tests/test_lora.py::test_peft_loads_our_adapters_on_the_hf_export",)),
    M("lora-merge-unscaled", "azllm/lora.py",
      "@ m.lora_A.weight.float() * m.lora_scaling", "@ m.lora_A.weight.float()",
      ("tests/test_lora.py::test_only_adapters_train_and_are_saved_alone",)),
    M("lora-base-not-frozen", "azllm/lora.py",
      "p.requires_grad_(False)", "p.requires_grad_(True)",
      ("tests/test_lora.py::test_only_adapters_train_and_are_saved_alone",)),
    M("lora-resume-from-step-zero", "azllm/train.py",
      'start, best_val = state["step"], state["best_val_loss"]',
      'start, best_val = 0, state["best_val_loss"]',
      ("tests/test_lora.py::test_lora_resume_is_exact",)),
    M("plan-lora-counts-base-gradients", "azllm/plan/lora_plan.py",
      'parts["gradients"] = 4 * n_lora if parts.get("gradients") else 0',
      'parts["gradients"] = parts.get("gradients", 0)',
      ("tests/test_lora.py::test_lora_estimate_is_within_tolerance_of_a_measured_step",)),
    M("gguf-llama3-rope-freqs-dropped", "azllm/export/gguf.py",
      "    if cfg.rope_scaling:  # llama3 RoPE", "    if False:  # llama3 RoPE",
      ("tests/test_import_hf.py::test_llama3_rope_scaling_matches_transformers_hf_export_and_llama_cpp",)),
    # ---- retrieval (azllm/rag) ----------------------------------------------------------------
    M("rag-python-lower", "azllm/rag/normalise.py",
      'return text.replace("İ", "i").replace("I", "ı").lower()', "return text.lower()",
      ("tests/test_rag.py::test_dotted_and_dotless_i_in_either_case_find_the_chunk",)),
    M("rag-no-stem", "azllm/rag/normalise.py",
      "return [strip_suffixes(w) for w in words] if self.stem else words", "return words",
      ("tests/test_rag.py::test_az_lower_gets_both_is_right_where_str_lower_does_not",)),
    M("rag-chunks-without-overlap", "azllm/rag/chunk.py",
      "        i = k\n", "        i = j\n",
      ("tests/test_rag.py::test_chunks_are_whole_sentences_that_overlap",)),
    M("rag-add-commits-per-chunk", "azllm/rag/index.py",
      'self.db.execute("INSERT INTO terms(rowid, body) VALUES (?, ?)", (cid, body))',
      'self.db.execute("INSERT INTO terms(rowid, body) VALUES (?, ?)", (cid, body)); '
      "self.db.commit()",
      ("tests/test_rag.py::test_a_failed_add_leaves_the_index_as_it_was",)),
    M("rag-searches-whole-conversation", "azllm/rag/prompt.py",
      "    text = last_user_text(messages)\n",
      '    text = " ".join(m["content"] for m in messages)\n',
      ("tests/test_rag.py::test_only_the_last_user_message_is_searched",)),
    M("rag-sources-untrimmed", "azllm/rag/prompt.py",
      "        if length(used + [src]) <= budget:\n            used",
      "        if True:\n            used",
      ("tests/test_rag.py::test_sources_are_trimmed_to_the_budget",)),
    M("rag-serve-sources-not-in-prompt", "azllm/chat/server.py",
      "messages, sources = await self._with_sources(messages, params, k)",
      "_, sources = await self._with_sources(messages, params, k)",
      ("tests/test_rag_serve.py::test_serve_rag_answers_with_sources",)),
    M("rag-stream-without-sources", "azllm/chat/server.py",
      "yield chunk(finish=ev[1], sources=sources)", "yield chunk(finish=ev[1])",
      ("tests/test_rag_serve.py::test_serve_rag_answers_with_sources",)),
    M("rag-page-hides-sources", "azllm/chat/web.py",
      "    showSources(out, sources);\n", "",
      ("tests/test_chat_web.py::test_sources_are_shown_under_the_answer",)),
    M("rag-terminal-sources-not-in-prompt", "azllm/chat/terminal.py",
      "ids, turns = fit_history(tok, turn_system, turns + [user], budget)",
      "ids, turns = fit_history(tok, system, turns + [user], budget)",
      ("tests/test_rag_serve.py::test_chat_loop_puts_the_sources_into_the_prompt",)),
    # ---- mixture of experts (azllm/moe.py) ----------------------------------------------------
    M("moe-no-renormalise", "azllm/moe.py",
      "return Routing(experts, weights / weights.sum(-1, keepdim=True), probs, logits)",
      "return Routing(experts, weights, probs, logits)",
      ("tests/test_moe.py::test_batched_experts_equal_a_per_token_reference",)),
    M("moe-weights-unsorted", "azllm/moe.py",
      "y = y * r.weights.reshape(-1)[order, None].to(y.dtype)",
      "y = y * r.weights.reshape(-1)[:, None].to(y.dtype)",
      ("tests/test_moe.py::test_batched_experts_equal_a_per_token_reference",)),
    M("moe-aux-loss-sign", "azllm/model.py",
      "return loss + self.moe_coefs[0] * aux[0] + self.moe_coefs[1] * aux[1]",
      "return loss - self.moe_coefs[0] * aux[0] + self.moe_coefs[1] * aux[1]",
      ("tests/test_moe.py::test_training_loss_adds_the_router_losses_times_their_coefficients",)),
    M("moe-balance-loss-uses-probs-twice", "azllm/moe.py",
      "f = counts / r.experts.shape[0]", "f = r.probs.mean(0) * r.experts.shape[1]",
      ("tests/test_moe.py::test_load_balance_loss_formula",)),
    M("moe-hf-gate-up-swapped", "azllm/export/hf.py",
      '(("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))',
      '(("gate_proj", "w3"), ("up_proj", "w1"), ("down_proj", "w2"))',
      ("tests/test_moe.py::test_hf_export_is_a_mixtral_with_our_logits",)),
    M("moe-gguf-expert-used-count", "azllm/export/gguf.py",
      "w.add_expert_used_count(cfg.experts_per_token)", "w.add_expert_used_count(1)",
      ("tests/test_moe.py::test_llama_cpp_logits_equal_ours",)),
    # ---- SentencePiece tokenizers (azllm/tokenizer_spm.py) --------------------------------------
    M("spm-bpe-merges-reversed", "azllm/tokenizer_spm.py",
      "    ranked.sort()\n", "    ranked.sort(reverse=True)\n",
      ("tests/test_sentencepiece.py::test_identical_to_sentencepiece_on_every_pretrain_line",)),
    M("spm-nfc-off", "azllm/tokenizer_spm.py",
      "tok.normalizer = normalizers.NFC()", "tok.normalizer = normalizers.Sequence([])",
      ("tests/test_sentencepiece.py::test_nfc_byte_fallback_and_special_strings_as_text",)),
    M("spm-ascii-not-required", "azllm/tokenizer_spm.py",
      "            required_chars=ASCII,\n", "",
      ("tests/test_sentencepiece.py::test_nfc_byte_fallback_and_special_strings_as_text",)),
    M("spm-hidden-pieces-matchable", "azllm/tokenizer_spm.py",
      'p["score"] if p["type"] == NORMAL else HIDDEN_SCORE', 'p["score"]',
      ("tests/test_sentencepiece.py::test_nfc_byte_fallback_and_special_strings_as_text",)),
    M("spm-gguf-scores-ascending", "azllm/tokenizer_spm.py",
      "scores = [-float(i) if t == NORMAL", "scores = [float(i) if t == NORMAL",
      ("tests/test_sentencepiece.py::test_llama_cpp_tokenizes_every_pretrain_line_as_we_do",)),
    M("spm-gguf-space-prefix", "azllm/export/gguf.py",
      "w.add_add_space_prefix(False)", "w.add_add_space_prefix(True)",
      ("tests/test_sentencepiece.py::test_llama_cpp_tokenizes_every_pretrain_line_as_we_do",)),
    M("spm-gguf-bytes-as-normal", "azllm/tokenizer_spm.py",
      "            types.append(BYTE)", "            types.append(NORMAL)",
      ("tests/test_sentencepiece.py::test_llama_cpp_tokenizes_every_pretrain_line_as_we_do",)),
    M("spm-decoder-no-byte-fallback", "azllm/tokenizer_spm.py",
      "decoders.ByteFallback(), ", "",
      ("tests/test_sentencepiece.py::test_nfc_byte_fallback_and_special_strings_as_text",)),
    M("spm-unigram-gguf-not-refused", "azllm/export/gguf.py",
      'if tok.kind == "sentencepiece-unigram":', "if False:",
      ("tests/test_sentencepiece.py::test_unigram_gguf_and_ollama_exports_are_refused",)),
    # ---- hardening: full disk, SIGTERM, leftovers, over-long lines (issue 11) ------------------
    M("train-weights-write-error-raw", "azllm/checkpoint.py",
      "with writing(path, errors=(SafetensorError,)), temp_path(path) as tmp:",
      "with temp_path(path) as tmp:",
      ("tests/test_hardening_io.py::test_train_on_a_full_disk",)),
    M("checkpoint-write-error-raw", "azllm/checkpoint.py",
      "        if failure is None:\n            raise", "        if True:\n            raise",
      ("tests/test_hardening_io.py::test_train_on_a_full_disk",)),
    M("checkpoint-half-written-kept", "azllm/checkpoint.py",
      "if write:  # nothing half-written stays", "if False:  # nothing half-written stays",
      ("tests/test_hardening_io.py::test_train_on_a_full_disk",)),
    M("sigterm-kills-outright", "azllm/cli.py",
      "return args.func in single and", "return False and",
      ("tests/test_signals.py",)),
    M("leipzig-visible-temporary", "azllm/corpus/download.py",
      "with temp_path(out_path) as tmp:",
      "for tmp in [out_path.with_name(out_path.name + '.tmp')]:",
      ("tests/test_hardening_io.py::"
       "test_leipzig_extraction_leaves_no_visible_or_stale_temporary",)),
    M("writing-misses-oserror", "azllm/atomic.py",
      "except (OSError, *errors) as e:", "except (*errors,) as e:",
      ("tests/test_hardening_io.py::test_export_to_an_immutable_folder_is_refused",)),
    M("training-text-lines-unbounded", "azllm/documents.py",
      "enumerate(readers._bounded_lines(f), 1)", "enumerate(f, 1)",
      ("tests/test_hardening_io.py::"
       "test_over_long_line_of_a_training_text_is_skipped_in_bounded_memory",)),
    # ---- the walkthrough notebook (runs it in a kernel; stops at the mojibake cell: ~10 s) -------
    M("notebook-mojibake-not-repaired", "azllm/corpus/clean.py",
      "    for _ in range(3):\n        if not _HINT.search(text):",
      "    for _ in range(0):\n        if not _HINT.search(text):",
      ("tests/test_notebook.py::test_walkthrough_notebook_executes",)),
    # ---- azllm tune: trials budgeted in steps, the optimizer in the default space ---------------
    M("tune-steps-budget-off-by-one", "azllm/tune/settings.py",
      '"train.max_steps": int(steps),', '"train.max_steps": int(steps) + 1,',
      ("tests/test_tune.py::test_a_steps_budgeted_trial_trains_exactly_n_steps",)),
    M("tune-steps-prune-on-time", "azllm/tune/study.py",
      "reports = [(v, at) for at, v in values", "reports = [(v, ms) for at, v in values",
      ("tests/test_tune.py::test_a_steps_budgeted_trial_trains_exactly_n_steps",)),
    M("tune-resume-ignores-steps-budget", "azllm/tune/study.py",
      'if was != (meta["minutes_per_trial"], meta["steps_per_trial"]):',
      'if was[0] != meta["minutes_per_trial"]:',
      ("tests/test_tune.py::test_a_steps_study_resumes_and_refuses_another_budget",)),
    M("tune-muon-lr-drawn-for-adamw", "azllm/tune/space.py",
      "return cond is None or cond[0] not in params or params[cond[0]] == cond[1]",
      "return True",
      ("tests/test_tune.py::test_default_space_chooses_the_optimizer_on_llama",)),
    M("tune-baseline-drops-derived-lr", "azllm/tune/space.py",
      'if key == "train.lr" and not out[key]:', "if False:",
      ("tests/test_tune.py::test_default_space_chooses_the_optimizer_on_llama",)),
    M("lr-derived-ignores-optimizer", "azllm/config.py",
      'return 10 * adamw if optimizer == "muon" else adamw', "return adamw",
      ("tests/test_optim.py::test_lr_follows_width_when_not_set",)),
    M("make-optimizer-derives-adamw-lr-for-muon", "azllm/config.py",
      "return tc.lr or derived_lr(m, tc.optimizer)", "return tc.lr or derived_lr(m)",
      ("tests/test_optim.py::test_lr_follows_width_when_not_set",)),
    M("warmup-derived-ignores-optimizer", "azllm/config.py",
      '    if tc.optimizer == "muon":\n        return 0\n', "",
      ("tests/test_optim.py::test_warmup_follows_the_optimizer_when_not_set",)),
    M("warmup-derived-uncapped", "azllm/config.py",
      "return min(round(2 / (1 - tc.beta2)), tc.max_steps // 10)",
      "return round(2 / (1 - tc.beta2))",
      ("tests/test_optim.py::test_warmup_follows_the_optimizer_when_not_set",)),
    M("lr-at-derived-warmup-unresolved", "azllm/optim.py",
      "warmup = warmup_of(tc)",
      "warmup = tc.warmup_steps",
      ("tests/test_optim.py::test_warmup_follows_the_optimizer_when_not_set",)),
    M("tune-baseline-drops-derived-warmup", "azllm/tune/space.py",
      'if key == "train.warmup_steps":', "if False:",
      ("tests/test_tune.py::test_default_space_chooses_the_optimizer_on_llama",)),
    M("tune-steps-budget-tunes-the-batch", "azllm/tune/space.py",
      "    if fixed_batch:\n", "    if False:\n",
      ("tests/test_tune.py::test_a_steps_budgeted_trial_trains_exactly_n_steps",)),
    # ---- one home per concept (issue 10): choices, sampling bounds, split, MFU, open files ------
    M("chat-precision-choices-retyped", "azllm/chat/cli.py",
      'p.add_argument("--precision", default="fp32", choices=PRECISIONS)',
      'p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"])',
      ("tests/test_one_home.py::test_every_flag_with_a_constant_takes_its_choices_from_it",)),
    M("api-sampling-bounds-unchecked", "azllm/chat/api.py",
      "        ).check()\n    except OutOfBounds", "        )\n    except OutOfBounds",
      ("tests/test_one_home.py::test_the_api_and_the_commands_accept_the_same_sampling_values",)),
    M("sampling-temperature-to-100", "azllm/sampling.py",
      "if not 0.0 <= self.temperature <= 2.0:", "if not 0.0 <= self.temperature <= 100.0:",
      ("tests/test_chat_server.py::test_bad_requests_get_openai_errors",)),
    M("corpus-split-own-53-bit-rule", "azllm/corpus/report.py",
      'return "val" if in_val(text.encode("utf-8"), self.val_fraction) else "train"',
      'u = (__import__("azllm.corpus.dedup").corpus.dedup.hash64(text) % 2**64) >> 11\n'
      '        return "val" if u / (1 << 53) < self.val_fraction else "train"',
      ("tests/test_one_home.py::test_corpus_and_tokenize_split_a_document_alike_at_its_threshold",)),
    M("batch-imports-torch", "azllm/batch.py",
      "if TYPE_CHECKING:  # torch", "if True:  # torch",
      ("tests/test_corpus_fastpaths.py::test_a_build_does_not_import_torch_scipy_or_datasketch",)),
    M("mfu-datasheet-over-measured-peak", "azllm/train.py",
      'last["mfu_vs_datasheet_peak"] = flops_s / (vendor_peak * d.world)',
      'last["mfu_vs_datasheet_peak"] = flops_s / (measured_peak * d.world)',
      ("tests/test_one_home.py::test_a_listed_gpu_logs_mfu_against_its_datasheet_peak",)),
    M("datasheet-first-match", "azllm/device.py",
      "for key in sorted(DATASHEET_PEAKS, key=len, reverse=True):",
      "for key in DATASHEET_PEAKS:",
      ("tests/test_one_home.py::test_datasheet_peak_takes_the_whole_card_name",)),
    M("datasheet-substring", "azllm/device.py",
      'if re.search(re.escape(key) + r"(?![0-9A-Za-z])", name):', "if key in name:",
      ("tests/test_one_home.py::test_datasheet_peak_takes_the_whole_card_name",)),
    M("cpuinfo-left-open", "azllm/device.py",
      'flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")',
      'flags = open("/proc/cpuinfo", encoding="utf-8").read()',
      ("tests/test_one_home.py::test_cpuinfo_is_read_and_closed",)),
    M("documents-file-left-open", "azllm/documents.py",
      ") as f:\n            for lineno, line in enumerate(",
      ") as f:\n            f = io.TextIOWrapper(open_binary(path, compression))\n"
      "            for lineno, line in enumerate(",
      ("tests/test_one_home.py::test_documents_are_read_and_their_files_closed",)),
    M("compressed-file-left-open", "azllm/corpus/formats.py",
      "    f.owned = raw\n", "",
      ("tests/test_one_home.py::test_documents_are_read_and_their_files_closed",)),
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
