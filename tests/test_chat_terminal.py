"""`azllm chat`: a real process fed through its stdin, plus the history trimming and streaming
checked in-process."""

import io
import subprocess
import time

import pytest
from chat_fixtures import REPO, chat_cli, make_run

from azllm.chat.engine import Engine
from azllm.chat.terminal import chat_loop, fit_history
from azllm.checkpoint import load_run
from azllm.generate import SamplingSettings


@pytest.fixture(scope="module")
def small_run(tokenizer_path, tmp_path_factory):
    return make_run(tokenizer_path, tmp_path_factory.mktemp("term") / "small-ctx", block_size=64)


def talk(run, lines, *flags, timeout=60):
    proc = subprocess.run(
        chat_cli("chat", "--run", run, *flags),
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_a_conversation_with_commands_ends_cleanly_at_eof(small_run):
    proc = talk(
        small_run,
        ["Salam!", "/system Sən şairsən.", "Necəsən?", "/reset", "/help", "/bogus", "Sağ ol"],
        "--seed",
        "1",
        "--max-new-tokens",
        "12",
        "--system",
        "Sən köməkçisən.",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("azllm chat with small-ctx (context 64 tokens, replies up to 12)")
    assert out.count("bot> ") == 3  # three messages, three replies
    assert "(system prompt set)" in out and "(conversation cleared)" in out
    assert "(unknown command /bogus" in out and "/reset (forget the conversation)" in out
    assert out.endswith("you> \n")  # EOF at the prompt: a newline, exit 0


def test_long_history_is_trimmed_to_the_context_and_quit_leaves(small_run):
    # context 64, replies up to 16: a prompt may have 48 tokens; each exchange takes ~25
    messages = [f"Bu mənim {i}-ci mesajımdır, cavab ver." for i in range(5)]
    proc = talk(
        small_run,
        [*messages, "söz " * 60, "/quit", "never read"],
        "--seed",
        "2",
        "--max-new-tokens",
        "16",
        "--system",
        "Kömək",
    )
    assert proc.returncode == 0
    out = proc.stdout
    assert out.count("bot> ") == 5  # the message that cannot fit gets no reply
    assert "(dropped the 2 oldest message(s) to fit the context)" in out
    assert "(that message needs" in out
    assert out.endswith("you> ")  # /quit: no newline from an EOF, "never read" unread


def test_fit_history_keeps_the_system_prompt_and_the_newest_turns(tok):
    turns = []
    for i in range(6):
        turns += [
            {"role": "user", "content": f"sual nömrə {i} " * 3},
            {"role": "assistant", "content": f"cavab {i} " * 4},
        ]
    turns.append({"role": "user", "content": "son sual"})
    for budget in (20, 40, 80, 1000):
        ids, kept = fit_history(tok, "Sistem", turns, budget)
        assert len(ids) <= budget or len(kept) == 1
        assert kept == turns[len(turns) - len(kept) :] and kept[0]["role"] == "user"
        assert (
            ids
            == tok.encode_chat(
                [{"role": "system", "content": "Sistem"}] + kept, add_generation_prompt=True
            )[0]
        )
        if len(kept) < len(turns):  # it dropped only what it had to
            longer = turns[len(turns) - len(kept) - 2 :]
            assert (
                len(tok.encode_chat([{"role": "system", "content": "Sistem"}] + longer, True)[0])
                > budget
            )


class Recorder(io.StringIO):
    """stdout that notes how many tokens the engine had made at each flush."""

    def __init__(self, engine):
        super().__init__()
        self.engine, self.flushes = engine, []

    def flush(self):
        self.flushes.append((self.getvalue(), self.engine.stats["tokens"]))


def test_reply_is_printed_while_it_is_generated(small_run):
    model, tok, _ = load_run(small_run)
    slow_forward = model.forward

    def forward(*a, **kw):  # a slower model, so that printing and decoding interleave visibly
        time.sleep(0.01)
        return slow_forward(*a, **kw)

    model.forward = forward
    engine = Engine(model, max_batch=1)
    try:
        out = Recorder(engine)
        chat_loop(
            engine,
            tok,
            stdin=io.StringIO("Salam\n"),
            stdout=out,
            max_new_tokens=20,
            sampling=SamplingSettings(temperature=1.0, seed=3),
        )
    finally:
        engine.shutdown()
    during = [n for text, n in out.flushes if text.count("bot> ") == 1 and n < 20]
    assert len(during) >= 5  # pieces of the reply went out before the reply was finished
