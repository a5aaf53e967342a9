"""`azllm serve --rag` over real HTTP and `azllm chat --rag` as a real process: the retrieved
chunks are in the prompt (the prompt's token count is that of the template with them) and come
back as "sources"; a question longer than the context is one error."""

import subprocess

import pytest
from chat_fixtures import REPO, ServerProcess, chat_cli, chat_run, post_json, post_sse  # noqa: F401

from azllm.rag.chunk import Chunking
from azllm.rag.evaluate import BUNDLED
from azllm.rag.index import Index
from azllm.rag.prompt import add_sources
from azllm.tokenizer import load_tokenizer

QUESTION = "Lahıc kəndi hansı rayondadır?"


@pytest.fixture(scope="module")
def rag_index(tmp_path_factory):
    path = tmp_path_factory.mktemp("rag") / "index"
    Index.create(path, [BUNDLED / "docs"], chunking=Chunking(200, 50))
    return path


@pytest.fixture(scope="module")
def rag_server(chat_run, rag_index):  # noqa: F811
    srv = ServerProcess(chat_run, "--rag", rag_index, "--rag-k", "3")
    yield srv
    srv.stop()


def expected_prompt(chat_run, rag_index, messages, k, max_tokens):  # noqa: F811
    """Token count and sources of the prompt the server should have built."""
    tok = load_tokenizer(chat_run / "tokenizer.json")
    with Index.open(rag_index) as ix:
        hits = ix.search(messages[-1]["content"], k)
    msgs, used = add_sources(tok, messages, hits, 256 - max_tokens)
    return len(tok.encode_chat(msgs, add_generation_prompt=True)[0]), [s.to_dict() for s in used]


def test_serve_rag_answers_with_sources(rag_server, chat_run, rag_index):  # noqa: F811
    messages = [
        {"role": "system", "content": "Qısa cavab ver."},
        {"role": "user", "content": QUESTION},
    ]
    body = {"messages": messages, "max_tokens": 8, "seed": 1, "ignore_eos": True}
    url = rag_server.url + "/v1/chat/completions"
    status, out = post_json(url, body)
    assert status == 200, out
    n_prompt, sources = expected_prompt(chat_run, rag_index, messages, 3, 8)
    assert out["sources"] == sources and [s["n"] for s in sources] == list(
        range(1, len(sources) + 1)
    )
    assert (
        sources
        and sources[0]["source"].endswith("01_lahic.txt")
        and "İsmayıllı" in sources[0]["text"]
    )
    assert out["usage"]["prompt_tokens"] == n_prompt  # the sources went into the prompt
    assert out["choices"][0]["finish_reason"] == "length"

    # streamed: the chunk with the finish_reason carries the same sources, no other chunk does
    status, _, events = post_sse(url, {**body, "stream": True})
    chunks = [e for e in events if e != "[DONE]"]
    with_sources = [c for c in chunks if "sources" in c]
    assert status == 200 and len(with_sources) == 1
    assert with_sources[0]["choices"][0]["finish_reason"] == "length"
    assert with_sources[0]["sources"] == sources

    # per request: rag off gives the plain prompt and no field; rag_k narrows it
    status, plain = post_json(url, {**body, "rag": False})
    assert status == 200 and "sources" not in plain
    assert plain["usage"]["prompt_tokens"] < n_prompt
    status, one = post_json(url, {**body, "rag_k": 1})
    assert status == 200 and one["sources"] == sources[:1]
    status, err = post_json(url, {**body, "rag_k": 0})
    assert status == 400 and err["error"]["param"] == "rag_k"


def test_serve_rag_question_longer_than_the_context_is_one_error(rag_server):
    body = {"messages": [{"role": "user", "content": "Lahıc İsmayıllı " * 200}], "max_tokens": 8}
    status, err = post_json(rag_server.url + "/v1/chat/completions", body)
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    assert "\n" not in err["error"]["message"] and "256" in err["error"]["message"]


def test_chat_rag_prints_the_sources_after_the_reply(chat_run, rag_index):  # noqa: F811
    proc = subprocess.run(
        chat_cli(
            "chat", "--run", chat_run, "--rag", rag_index, "--max-new-tokens", "8", "--seed", "1"
        ),
        input=f"{QUESTION}\n{'Lahıc ' * 300}\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    line = next(x for x in lines if x.startswith("sources: "))
    assert line.startswith("sources: [1] docs/01_lahic.txt (chunk ")
    assert "that message needs" in proc.stdout  # the too-long question: one line, no reply
    assert proc.stdout.count("bot> ") == 1


def test_chat_loop_puts_the_sources_into_the_prompt(chat_run, rag_index):  # noqa: F811
    import io

    from azllm.chat.engine import Engine
    from azllm.chat.terminal import chat_loop
    from azllm.checkpoint import load_run

    model, tok, _ = load_run(chat_run, "cpu", "model")
    engine, prompts = Engine(model, max_batch=1), []
    real_submit = engine.submit

    def submit(prompt, **kw):
        prompts.append(tok.decode(prompt, skip_special=False))
        return real_submit(prompt, **kw)

    engine.submit = submit
    out = io.StringIO()
    try:
        with Index.open(rag_index) as ix:
            chat_loop(engine, tok, system="Qısa yaz.", rag=ix, rag_k=2, max_new_tokens=8,
                      stdin=io.StringIO(f"{QUESTION}\nQuba\n"), stdout=out)  # fmt: skip
    finally:
        engine.shutdown()
    first, second = prompts
    assert first.startswith("<|bos|><|system|>Qısa yaz.\n\nSuala aşağıdakı mənbələrə")
    assert "[1] (docs/01_lahic.txt) " in first and "İsmayıllı" in first
    assert "[1] (docs/09_quba.txt) " in second and "[1] (docs/01_lahic.txt)" not in second
    assert second.count("<|system|>") == 1  # this turn's sources replace the last turn's
    assert out.getvalue().count("sources: [1] docs/") == 2


def test_rag_request_fields_are_checked():
    from azllm.chat.api import ApiError, rag_request

    assert rag_request({}, True, 4) == 4 and rag_request({}, False, 4) == 0
    assert rag_request({"rag": False}, True, 4) == 0 and rag_request({"rag_k": 2}, True, 4) == 2
    bad = [
        ({"rag": True}, False, "rag"),  # no index on this server
        ({"rag": "yes"}, True, "rag"),
        ({"rag_k": 21}, True, "rag_k"),
        ({"rag_k": 1.5}, True, "rag_k"),
    ]
    for body, has, param in bad:
        with pytest.raises(ApiError) as e:
            rag_request(body, has, 4)
        assert e.value.status == 400 and e.value.param == param
