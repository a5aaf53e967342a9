"""A run for Ollama: a GGUF file plus a Modelfile, and the `ollama create` command to load them.

    azllm export ollama --run RUN --out DIR [--type q4_k_m] [--name NAME]
    ollama create NAME -f DIR/Modelfile && ollama run NAME

The Modelfile's TEMPLATE is our chat template (tokenizer.render_chat with a trailing
<|assistant|>) in Ollama's Go template language. Ollama puts the Modelfile's SYSTEM, if any, and
the conversation into .Messages, so one range over .Messages covers every request. The GGUF is
written with add_bos_token = false, so the template writes <|bos|> itself, as render_chat does.
Generation stops at <|end|> (end of a turn) and at the other turn markers, in case a small model
forgets to close its turn. An imported run (hf_import.py) gets its own template's turns instead
(imported_template) and stops at its end of turn and EOS.
"""

from __future__ import annotations

import re
from pathlib import Path

from azllm.atomic import atomic_dir, terminate_raises, writing
from azllm.errors import AzllmError
from azllm.export import SAMPLING, check_out_dir
from azllm.tokenizer import ASSISTANT, BOS, END, EOS, SYSTEM, USER

# Go template, equivalent to render_chat(messages, add_generation_prompt=True).
TEMPLATE = (
    BOS + "{{ range .Messages }}<|{{ .Role }}|>{{ .Content }}" + END + "{{ end }}" + ASSISTANT
)
STOPS = (END, EOS, USER, SYSTEM)


def imported_template(c) -> tuple[str, tuple[str, ...]]:
    """(TEMPLATE, stops) for an imported tokenizer's ChatFormat (tokenizer.py): the same
    start + prefix + content + suffix per role as AzTokenizer.render_chat."""
    turns = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{r}" }}}}'
        f"{c.prefix[r]}{{{{ .Content }}}}{c.suffix[r]}"
        for i, r in enumerate(("system", "user", "assistant"))
    )
    body = f"{{{{ range .Messages }}}}{turns}{{{{ end }}}}{{{{ end }}}}"
    return c.start + body + c.prefix["assistant"], tuple(dict.fromkeys((c.end, c.eos)))


def modelfile(gguf_name: str, block_size: int, chat=None) -> str:
    template, stops = imported_template(chat) if chat is not None else (TEMPLATE, STOPS)
    lines = [
        "# Made by `azllm export ollama`. Load it with: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        *(f'PARAMETER stop "{s}"' for s in stops),
        f"PARAMETER num_ctx {block_size}",
        f"PARAMETER temperature {SAMPLING.temperature}",
        f"PARAMETER top_k {SAMPLING.top_k}",
        "PARAMETER num_gpu 99",  # offload every layer to the GPU when there is one
    ]
    return "\n".join(lines) + "\n"


def model_name(run_dir: Path, name: str | None) -> str:
    """Ollama model names: lowercase letters, digits, '.', '-', '_'."""
    if name is not None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*(:[a-z0-9._-]+)?", name):
            raise AzllmError(f"--name {name!r}: use lowercase letters, digits, '.', '-', '_'")
        return name
    base = re.sub(r"[^a-z0-9._-]+", "-", Path(run_dir).resolve().name.lower()).strip("-._")
    return base or "azllm"


def export_ollama(
    run_dir: str | Path,
    out_dir: str | Path,
    kind: str = "q4_k_m",
    *,
    name: str | None = None,
    weights: str = "model",
    force: bool = False,
) -> tuple[Path, str]:
    """Write DIR/{name}-{kind}.gguf and DIR/Modelfile; return (DIR, the ollama create command)."""
    from azllm.export import load_for_export
    from azllm.export.gguf import check_kind, write_gguf_file

    kind = check_kind(kind)
    out = Path(out_dir)
    check_out_dir(out, force)
    name = model_name(Path(run_dir), name)
    model, tok, cfg = load_for_export(run_dir, weights)
    gguf_name = f"{name.replace(':', '-')}-{kind}.gguf"
    with terminate_raises(), writing(out), atomic_dir(out, replace=True) as tmp:
        write_gguf_file(model, tok, cfg, tmp / gguf_name, kind, Path(run_dir).resolve().name)
        text = modelfile(gguf_name, cfg.block_size, tok.chat)  # tok.chat: an imported run's
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
    return out, f"ollama create {name} -f {out / 'Modelfile'}"
