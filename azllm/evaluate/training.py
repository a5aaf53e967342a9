"""Task accuracy during training: `azllm train/sft --eval-tasks PATH --eval-tasks-every N`.

The trainer calls `TaskEval.scores` at its evaluation points (on the main process, with the
unwrapped model); the scores go to metrics.jsonl as {"step", "tasks": {task: score}} and into
loss.png's second panel. Scores are accuracy for multiple choice and exact match for QA; SFT
runs ask in chat form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from azllm.errors import AzllmError


@dataclass
class TaskEval:
    specs: list[str]
    every: int
    chat: bool = False
    shots: int = 0
    limit: int | None = None
    tasks: list = field(default_factory=list)

    def __post_init__(self) -> None:  # on the command line, before any model is built
        if self.every < 1:
            raise AzllmError(f"--eval-tasks-every {self.every}: must be at least 1 (steps)")

    def load(self) -> TaskEval:
        """Read and check the task files (before the first step, so a bad file costs nothing)."""
        from azllm.evaluate.tasks import load_tasks

        self.tasks = [t for s in self.specs for t in load_tasks(s)]
        if self.shots and not all(t.dev for t in self.tasks):
            raise AzllmError("--eval-tasks: shots need a dev split in every task")
        return self

    def due(self, step: int, final: bool) -> bool:
        return step % self.every == 0 or final

    def scores(self, model, tok, precision: str = "fp32") -> dict[str, float]:
        from azllm.evaluate.backends import RunBackend
        from azllm.evaluate.harness import run_task

        was_training = model.training
        model.eval()
        try:
            backend = RunBackend(model, tok, precision=precision)
            out = {}
            for t in self.tasks:
                recs = run_task(backend, t, shots=self.shots, chat=self.chat, limit=self.limit)
                out[t.name] = sum(float(r["correct"]) for r in recs) / max(len(recs), 1)
            return out
        finally:
            model.train(was_training)
