"""The chat page in a real headless browser (Debian's chromium driven by Playwright): type a
message, watch the reply stream in, check the sampling controls reach the API, save a
screenshot (into the test's tmp_path). Needs `apt-get install -y chromium` and
`pip install playwright` (no browser download: the system chromium at /usr/bin/chromium is
used; .ci/run installs it and CI=true makes its absence a failure)."""

import json
from pathlib import Path

import pytest
from chat_fixtures import chat_run, server  # noqa: F401  (fixtures)

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Records every text the newest reply bubble shows, so the test can see it grow. On a fast
# machine the whole reply can arrive in one network read and be drawn once, so the real
# server's stream is handed to the page one server-sent event at a time, 25 ms apart: what is
# tested is that the page draws each event as it comes, not how fast the network is.
WATCH = """
() => {
const realFetch = window.fetch;
window.fetch = async (...args) => {
  const response = await realFetch(...args);
  if (!String(args[0]).includes('/v1/chat/completions') || !response.body) return response;
  const reader = response.body.getReader();
  const enc = new TextEncoder(), dec = new TextDecoder();
  let buf = '';
  const body = new ReadableStream({
    async pull(ctrl) {
      for (;;) {
        const cut = buf.indexOf('\\n\\n');
        if (cut >= 0) {
          await new Promise(r => setTimeout(r, 25));
          ctrl.enqueue(enc.encode(buf.slice(0, cut + 2)));
          buf = buf.slice(cut + 2);
          return;
        }
        const { value, done } = await reader.read();
        if (done) { if (buf) ctrl.enqueue(enc.encode(buf)); ctrl.close(); return; }
        buf += dec.decode(value, { stream: true });
      }
    }
  });
  return new Response(body, { status: response.status, headers: response.headers });
};
window.__seen = [];
new MutationObserver(() => {
  const all = document.querySelectorAll('.msg.assistant');
  if (all.length) window.__seen.push(all[all.length - 1].textContent);
}).observe(document.body, {subtree: true, childList: true, characterData: true});
}
"""


@pytest.fixture(scope="module")
def page(request):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (no browser download needed)"
    )
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: apt-get install -y chromium")
    srv = request.getfixturevalue("server")  # started only when the browser is there
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        pg = browser.new_page(viewport={"width": 1100, "height": 700})
        pg.set_default_timeout(30_000)
        pg.goto(srv.url + "/")
        pg.evaluate(WATCH)
        yield pg
        browser.close()


def ask(page, text):
    """Send a message; wait for its reply to finish; return the reply bubble's reply text."""
    before = page.locator(".msg.assistant, .msg.error").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    bubble = page.locator(".msg.assistant, .msg.error").nth(before)
    bubble.wait_for()
    page.wait_for_function(
        "n => document.querySelectorAll('.msg.assistant, .msg.error')[n].dataset.state === 'done'",
        arg=before,
    )
    return bubble


def test_a_typed_message_gets_a_streamed_reply(page, chat_run, tmp_path):  # noqa: F811
    assert chat_run.name in page.locator("#model").inner_text()
    for attempt in range(3):  # a random model may end a reply at once; ask again then
        page.evaluate("window.__seen = []")
        bubble = ask(page, f"Salam! Necəsən? ({attempt})")
        reply = bubble.evaluate(
            "b => b.firstChild && b.firstChild.nodeType === 3 ? b.firstChild.textContent : ''"
        )
        if reply:
            break
    assert "msg assistant" in bubble.get_attribute("class")
    assert page.locator(".msg.user").last.inner_text() == f"Salam! Necəsən? ({attempt})"
    seen = [s for s in page.evaluate("window.__seen") if s]
    assert len(set(seen)) >= 3, seen  # the reply grew piece by piece while it streamed
    assert "tokens · " in bubble.locator(".meta").inner_text()
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5000  # kept in the test's own temporary folder only


def test_sampling_controls_and_system_prompt_reach_the_api(page):
    page.click("#reset")
    assert page.locator(".msg").count() == 0
    page.fill("#system", "Sən qısa cavab verən köməkçisən.")
    page.fill("#max-tokens", "5")
    page.eval_on_selector(
        "#temperature", "e => { e.value = '0.35'; e.dispatchEvent(new Event('input')); }"
    )
    assert page.inner_text("#temperature-out") == "0.35"
    with page.expect_request("**/v1/chat/completions") as req:
        bubble = ask(page, "Bir söz de.")
    body = json.loads(req.value.post_data)
    assert body["stream"] is True and body["max_tokens"] == 5 and body["temperature"] == 0.35
    assert body["top_p"] == 0.95
    assert body["messages"] == [
        {"role": "system", "content": "Sən qısa cavab verən köməkçisən."},
        {"role": "user", "content": "Bir söz de."},
    ]
    meta = bubble.locator(".meta").inner_text()
    n = int(meta.split()[0])
    assert 0 <= n <= 5 and meta.endswith("length" if n == 5 else "stop")
    # the next turn sends the history: system, user, assistant, user
    with page.expect_request("**/v1/chat/completions") as req:
        ask(page, "Bir daha.")
    roles = [m["role"] for m in json.loads(req.value.post_data)["messages"]]
    assert roles == ["system", "user", "assistant", "user"]


def test_an_api_error_is_shown_in_the_page(page):
    page.click("#reset")
    page.fill("#max-tokens", "100000")  # more than the context: the server says 400
    bubble = ask(page, "Salam")
    assert "msg error" in bubble.get_attribute("class")
    assert "context length" in bubble.inner_text()
    page.fill("#max-tokens", "8")
    ok = ask(page, "Salam yenə")
    assert "msg assistant" in ok.get_attribute("class")


def test_sources_are_shown_under_the_answer(page, chat_run, tmp_path):  # noqa: F811
    from chat_fixtures import ServerProcess

    from azllm.rag.chunk import Chunking
    from azllm.rag.evaluate import BUNDLED
    from azllm.rag.index import Index

    Index.create(tmp_path / "index", [BUNDLED / "docs"], chunking=Chunking(200, 50))
    srv = ServerProcess(chat_run, "--rag", tmp_path / "index", "--rag-k", "2")
    rag_page = page.context.browser.new_page()  # the module's browser, a second tab
    try:
        rag_page.set_default_timeout(30_000)
        rag_page.goto(srv.url + "/")
        rag_page.fill("#max-tokens", "8")
        bubble = ask(rag_page, "Lahıc kəndi hansı rayondadır?")
        assert "msg assistant" in bubble.get_attribute("class")
        heads = bubble.locator(".sources summary").all_inner_texts()
        assert heads and heads[0].startswith("[1] docs/01_lahic.txt · chunk "), heads
        assert "İsmayıllı" in bubble.locator(".sources details").first.text_content()
    finally:
        rag_page.close()
        srv.stop()
