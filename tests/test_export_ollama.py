"""`azllm export ollama`: the Modelfile parses, its TEMPLATE rendered by Go's own text/template
(py-go-template: Go's library built as a shared object; Ollama itself is not installable here)
with the data Ollama passes (.Messages of {Role, Content}) is exactly our chat template, and the
GGUF it points to is one llama.cpp loads and tokenizes the rendered prompt to our chat ids."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from export_fixtures import CHAT, run_export_cli, trained_run  # noqa: E402

from azllm.checkpoint import load_run  # noqa: E402
from azllm.errors import AzllmError  # noqa: E402
from azllm.export.ollama import export_ollama  # noqa: E402
from azllm.tokenizer import END, EOS, render_chat  # noqa: E402


def parse_modelfile(text: str) -> dict:
    """FROM, TEMPLATE (triple-quoted, may span lines), PARAMETER lines (repeatable)."""
    out: dict = {"PARAMETER": {}}
    lines = iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        cmd, _, value = line.partition(" ")
        value = value.strip()
        if value.startswith('"""'):
            while not (len(value) >= 6 and value.endswith('"""')):
                value += "\n" + next(lines)
            value = value[3:-3]
        if cmd.upper() == "PARAMETER":
            key, _, v = value.partition(" ")
            out["PARAMETER"].setdefault(key, []).append(shlex.split(v)[0])
        else:
            out[cmd.upper()] = value
    return out


def render_go(template: str, data: dict, workdir: Path) -> str:
    """Go's text/template, as Ollama runs a Modelfile TEMPLATE: messages are Go structs there, so
    their fields are .Role and .Content (capitalised). In a child process: on a template error
    the Go library exits its process."""
    pytest.importorskip("go_template", reason="pip install py-go-template")
    data = {
        **data,
        "Messages": [{k.capitalize(): v for k, v in m.items()} for m in data.get("Messages", [])],
    }
    path = workdir / "TEMPLATE.tmpl"
    path.write_text(template, encoding="utf-8")
    code = (
        "import json, sys; from pathlib import Path; from go_template import render; "
        "sys.stdout.buffer.write(render(Path(sys.argv[1]), json.loads(sys.argv[2])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path), json.dumps(data)], capture_output=True, timeout=60
    )
    out = proc.stdout.decode("utf-8")
    if proc.returncode != 0:
        raise AssertionError(f"Go template error: {out} {proc.stderr.decode()}".strip())
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = trained_run("llama")
    out, command = export_ollama(run, tmp_path_factory.mktemp("ollama") / "az", "q8_0")
    return run, out, command


def test_modelfile_fields(exported):
    run, out, command = exported
    mf = parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))
    assert mf["FROM"].startswith("./") and (out / mf["FROM"][2:]).is_file()
    p = mf["PARAMETER"]
    assert END in p["stop"] and EOS in p["stop"]
    assert p["num_ctx"] == [str(load_run(run)[2].model.block_size)]
    assert p["num_gpu"] == ["99"]
    assert float(p["temperature"][0]) > 0 and int(p["top_k"][0]) > 0
    assert command == f"ollama create {run.name.lower()} -f {out / 'Modelfile'}"


@pytest.mark.parametrize("convo", [CHAT, CHAT[1:2], CHAT[:3]], ids=["full", "one", "sys"])
def test_template_renders_our_chat_template(exported, convo, tmp_path):
    _, out, _ = exported
    template = parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))["TEMPLATE"]
    assert render_go(template, {"Messages": convo}, tmp_path) == render_chat(convo, True)


def test_go_renderer_is_real_go(tmp_path):
    """Go's semantics, not a look-alike: trim markers eat newlines, text is not HTML-escaped,
    and a malformed action or an unknown field is an error, not a silent blank."""
    t = "A{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}{{- \n .X -}} B"
    data = {"Messages": [{"role": "u", "content": "<c>"}], "X": 1}
    assert render_go(t, data, tmp_path) == "A[u:<c>]1B"
    with pytest.raises(AssertionError, match="parse template failed"):
        render_go("{{ if }}", {}, tmp_path)
    with pytest.raises(AssertionError, match='no entry for key "Nope"'):
        render_go("{{ .Nope }}", {}, tmp_path)


def test_llama_cpp_tokenizes_the_rendered_prompt_to_our_chat_ids(exported, tmp_path):
    pytest.importorskip("llama_cpp")
    from azllm.export.llamacpp import loaded

    run, out, _ = exported
    _, tok, _ = load_run(run)
    mf = parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))
    prompt = render_go(mf["TEMPLATE"], {"Messages": CHAT}, tmp_path)
    with loaded(out / mf["FROM"][2:]) as llm:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        add_bos = llm.metadata["tokenizer.ggml.add_bos_token"]
    assert ids == tok.encode_chat(CHAT, add_generation_prompt=True)[0]
    assert add_bos == "false"  # the template writes <|bos|> itself


def test_cli_prints_the_create_command(tmp_path):
    pytest.importorskip("llama_cpp")  # the default type, q4_k_m, needs llama.cpp's quantizer
    run = trained_run("gpt2")
    proc = run_export_cli("ollama", "--run", run, "--out", tmp_path / "o", "--name", "az-gpt2")
    assert proc.returncode == 0, proc.stderr
    assert f"ollama create az-gpt2 -f {tmp_path / 'o' / 'Modelfile'}" in proc.stdout
    assert (tmp_path / "o" / "az-gpt2-q4_k_m.gguf").is_file()


def test_bad_name_is_a_one_line_error(tmp_path):
    with pytest.raises(AzllmError, match="--name"):
        export_ollama(trained_run("llama"), tmp_path / "o", "q8_0", name="Bad Name!")
