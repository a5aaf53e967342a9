# The cells of walkthrough.ipynb (percent format: `# %%` starts a code cell, `# %% [markdown]` a
# markdown cell). Edit here, then run `python notebooks/build_walkthrough.py`.
# ruff: noqa: E402

# %% [markdown]
# # azllm: mətndən söhbət edən modelə — bütün zəncir bir dəftərdə
#
# Bu dəftər azllm-in bütün yolunu addım-addım keçir: korpusu təmizləyir, tokenizator
# (tokenizer) öyrədir, kiçik bir transformer modeli qurur və öyrədir, diqqətin (attention) nəyə
# baxdığını çəkir, müxtəlif nümunə götürmə (sampling) üsullarını yan-yana qoyur, modeli
# söhbətə öyrədir (SFT), test suallarında qiymətləndirir və nəhayət GGUF faylına ixrac edib
# eyni sualı llama.cpp ilə soruşur. Hər addım layihənin öz Python funksiyalarını çağırır —
# terminaldakı `azllm ...` əmrlərinin arxasında duran eyni funksiyaları.
#
# **Dil seçimi.** İzahlar azərbaycanca, koddakı şərhlər (comments) ingiliscədir. Bu dəftəri
# açan, çox vaxt, öz dili üçün model qurmağı öyrənən azərbaycanlıdır və ekranda gördüyü hər
# şey — tokenlər, nümunələr, söhbət — azərbaycancadır, ona görə izah da onun dilində olmalıdır.
# Kod isə layihənin qalanı kimi ingiliscə yazılıb (funksiya adları, xəta mesajları, README):
# şərhlər də kodun dilində qalır ki, bir parçanı layihəyə köçürəndə və ya termini (attention,
# top-p, fertility) axtaranda iki dil qarışmasın. Terminin ingiliscə adı ilk dəfə mötərizədə
# verilir; qrafiklərdəki yazılar da elədir.
#
# **Necə işlədilir.** Xanaları yuxarıdan aşağı bir-bir işlədin (Shift+Enter).
# `FAST = True` (standart) hər şeyi kiçik saxlayır: adi prosessorda (CPU) bir neçə dəqiqə.
# `FAST = False` böyük model və uzun öyrətmə deməkdir — onu GPU ilə işlədin.

# %% [markdown]
# ## 0. Quraşdırma
#
# **Google Colab-da:** menyudan **Runtime → Change runtime type → T4 GPU** seçin (pulsuz GPU),
# sonra aşağıdakı xananı işlədin. `FAST = True` üçün GPU vacib deyil (CPU runtime da olar);
# `FAST = False` üçün GPU lazımdır, yoxsa öyrətmə çox uzanar. Quraşdırma bir-iki dəqiqə çəkir
# (PyTorch yüklənir).
#
# **Öz kompüterinizdə (Jupyter):** reponu klonlayın, `pip install -e '.[gguf,notebook]'` edin və
# dəftəri `notebooks/` qovluğundan açın. Xana azllm artıq quraşdırılıbsa heç nə etmir; klonun
# içində açılıbsa `pip install -e ..` edir, yoxdursa `AZLLM_SOURCE`-da göstərilən yerdən (git
# reposunun ünvanı və ya yüklənmiş qovluq) quraşdırır.
#
# Son bölmədəki llama.cpp üçün `llama-cpp-python` lazımdır; o, llama.cpp-ni mənbədən
# kompilyasiya edir (Colab-da ~5 dəqiqə), ona görə standart olaraq quraşdırılmır:
# `INSTALL_LLAMA_CPP = True` edin və ya sonra `pip install llama-cpp-python` işlədin.

# %%
# Install azllm where it is missing (a fresh Colab/Jupyter machine). Inside a clone where it is
# installed, and in CI, this cell changes nothing.
import importlib.util
import subprocess
import sys
from pathlib import Path

# Outside a clone: where to install azllm from, as pip reads it: "git+https://…" of the
# repository you got this notebook from, or the path of a copy uploaded to the machine.
AZLLM_SOURCE = ""
INSTALL_LLAMA_CPP = False  # True: also build llama-cpp-python (section 9; ~5 min on Colab)

if importlib.util.find_spec("azllm") is None:
    clone = next(
        (p for p in [Path.cwd(), *Path.cwd().parents] if (p / "azllm" / "cli.py").exists()), None
    )
    if clone is None and not AZLLM_SOURCE:
        raise SystemExit("azllm is not installed here: set AZLLM_SOURCE above and run this again")
    what = ["-e", f"{clone}[notebook]"] if clone else [f"azllm[notebook] @ {AZLLM_SOURCE}"]
    # gguf-py writes GGUF files (section 9); it is pure Python, so it installs in seconds
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *what, "gguf>=0.19"])
    if INSTALL_LLAMA_CPP:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "llama-cpp-python"])
    importlib.invalidate_caches()
azllm = importlib.import_module("azllm")

print("azllm from", Path(azllm.__file__).parent)

# %% [markdown]
# ## Parametrlər
#
# Növbəti xana papermill üslubunda `parameters` etiketlidir: avtomatik işlədəndə (CI belə edir)
# onun dəyərləri əvəz olunur. `FAST = True` — kiçik ölçülər, CPU üçün; `FAST = False` — böyük
# model, daha çox addım, GPU üçün.

# %% tags=parameters
FAST = True  # True: CPU-sized, a few minutes (CI runs this); False: bigger, for a GPU runtime

# %%
# Settings that follow from FAST, the work folder and a few display helpers used below.
import html
import io
import json
import math
import shutil
import threading
import time

import torch
from IPython.display import HTML, Image, Markdown, display
from matplotlib.figure import Figure

from azllm.quickstart import MODEL as QUICKSTART_MODEL
from azllm.quickstart import TRAIN as QUICKSTART_TRAIN
from azllm.quickstart import one_thread_if_busy, sample_corpus

T0 = time.perf_counter()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WORK = Path("azllm-walkthrough").resolve()  # everything the notebook writes goes here
shutil.rmtree(WORK, ignore_errors=True)
WORK.mkdir()

if FAST:  # a 2-layer, 128-wide model: about a minute of training on 2 CPU cores
    VOCAB_SIZE = 2048
    MODEL = {"model.n_layer": 2, "model.n_head": 4, "model.n_embd": 128, "model.block_size": 128}
    TRAIN = {
        "train.micro_batch": 16,
        "train.lr": 3e-3,
        "train.warmup_steps": 10,
        "train.max_steps": 150,
        "train.eval_interval": 25,
        "train.eval_batches": 4,
        "train.log_interval": 5,
    }
    SFT_EPOCHS, SFT_LR = 150, 3e-3  # ~90 short steps: the 20 dialogues are learnt by heart
    EVAL_PER_FILE = 6  # az-basic: the first 6 questions of each subject (None: all 310)
else:  # the quickstart's model (4 layers, 256 wide), for longer: minutes on a T4 GPU
    VOCAB_SIZE = 4096
    MODEL = dict(QUICKSTART_MODEL)
    TRAIN = {**QUICKSTART_TRAIN, "train.max_steps": 800, "train.eval_interval": 50}
    SFT_EPOCHS, SFT_LR, EVAL_PER_FILE = 100, 1e-3, None
TRAIN.update({"train.ckpt_interval": 100_000, "train.compile": "off", "train.device": DEVICE})

busy = one_thread_if_busy()  # on a CPU shared with other work, one thread is faster
print(busy or f"device {DEVICE}, {torch.get_num_threads()} CPU threads, work folder {WORK}")

PALETTE = ["#fde2e4", "#d8f3dc", "#dbe7fd", "#fff1c1", "#eadcf8", "#cdeff0", "#ffe0c7"]


def png(fig: Figure) -> Image:
    """A matplotlib figure as a PNG image (no pyplot: works with any backend, from any thread)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return Image(buf.getvalue(), format="png")


def show(fig: Figure) -> None:
    display(png(fig))


def table(rows: list[list], header: list[str]) -> HTML:
    """A small HTML table (no pandas needed)."""
    th = "".join(f"<th style='text-align:left'>{html.escape(str(h))}</th>" for h in header)
    trs = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'>{c}</td>" for c in r) + "</tr>" for r in rows
    )
    return HTML(f"<table><tr>{th}</tr>{trs}</table>")


def esc(s: str) -> str:
    return html.escape(s).replace("\n", "<br>")


# %% [markdown]
# ## 1. Korpusun təmizlənməsi: "mojibake"
#
# İnternetdən yığılan azərbaycanca mətnlərin bir hissəsi **mojibake** olur: UTF-8 baytları səhv
# kodlaşdırma ilə (məsələn, türk Windows-un cp1254-ü ilə) oxunub yenidən yazılır və `ə` hərfi
# `É™`, `ş` hərfi `ÅŸ` olur. Bəzi baytları cp1254 ümumiyyətlə tanımır və atır — onda `Ə`
# yalnız `Æ` kimi qalır. Model belə mətndən öyrənsə, "hərflərin" yarısı zibil olar.
#
# Aşağıda düzgün bir mətni qəsdən korlayırıq (üç üsulla, ikiqat korlama da daxil) və
# `azllm.corpus.clean.clean_text` ilə bərpa edirik. Həmin funksiya `azllm corpus build`-də
# hər sənədə tətbiq olunur.

# %%
from azllm.corpus.clean import clean_text

ORIGINAL = (
    "Şəki xan sarayının divarlarındakı rəsmlər iki əsrdən çoxdur ki, gözəlliyini itirmir.\n"
    "Əlifbamızın xüsusi hərfləri: Ə ə, Ğ ğ, I ı, İ i, Ö ö, Ş ş, Ü ü, Ç ç."
)


def misread(text: str, codepage: str) -> str:
    # UTF-8 bytes read as a Windows code page; bytes the code page lacks are dropped, as many
    # tools do (so "Ə" = C6 8F loses its 8F and becomes a lone "Æ")
    return text.encode("utf-8").decode(codepage, errors="ignore")


broken = {
    "cp1254 (türk Windows)": misread(ORIGINAL, "cp1254"),
    "cp1252 (Qərbi Avropa)": misread(ORIGINAL, "cp1252"),
    "cp1254 iki dəfə": misread(misread(ORIGINAL, "cp1254"), "cp1254"),
}
rows = []
for name, text in broken.items():
    fixed = clean_text(text)
    ok = "✅ bəli" if fixed == ORIGINAL else "❌ yox"
    rows.append([name, f"<code>{esc(text)}</code>", esc(fixed), ok])
    assert fixed == ORIGINAL, name  # the repair must give back the exact original
display(table(rows, ["korlama", "əvvəl (before)", "sonra (after)", "orijinalla eyni?"]))

# %% [markdown]
# Təmizləmə təkcə mojibake deyil: `clean_text` Unicode-u NFC formasına gətirir, görünməyən
# simvolları (yumşaq defis, sıfır enli boşluq) silir, latın sözünün içinə düşmüş kiril `ә`-ni
# və ona oxşayan `ǝ`-ni düzgün `ə` edir, qırılmayan boşluğu adi boşluq edir.

# %%
messy = "Bakı\u00adda hava gözəldir,\u00a0amma kül\u04d9k əsir. G\u01ddncə \u200bş\u04d9h\u04d9ri."
fixed = clean_text(messy)
display(
    table(
        [[f"<code>{esc(ascii(messy))}</code>", esc(fixed)]],
        ["əvvəl (gizli simvollar görünsün deyə ascii ilə)", "sonra"],
    )
)
assert fixed == "Bakıda hava gözəldir, amma külək əsir. Gəncə şəhəri."

# %% [markdown]
# ## 2. Tokenizator (tokenizer)
#
# Model hərflərlə yox, **tokenlərlə** işləyir. azllm bayt səviyyəli BPE (byte-level BPE) öyrədir:
# əvvəl hər bayt bir tokendir, sonra korpusda ən tez-tez yan-yana gələn cütlər birləşdirilir və
# lüğət (vocabulary) istənən ölçüyə çatana qədər davam edir. Tez-tez işlənən sözlər bir tokenə,
# nadir sözlər bir neçə parçaya düşür.
#
# Korpus azllm ilə gələn ~1.7 MB mətndir: `azllm/data/sample/` (layihənin öz mətnləri) və
# `azllm/data/sample_public/` (klassik şeir, Füzuli, Vikipediya və FLORES-200 cümlələri).

# %%
from azllm.documents import iter_all_documents
from azllm.shards import tokenize_to_shards
from azllm.tokenizer import AzTokenizer, tokenizer_stats, train_tokenizer

CORPUS = sample_corpus()  # the bundled corpus: two folders inside the azllm package
t = time.perf_counter()
tok = AzTokenizer(train_tokenizer(iter_all_documents(CORPUS), VOCAB_SIZE))
tok.save(WORK / "tokenizer.json")
print(f"{tok.vocab_size} tokens trained in {time.perf_counter() - t:.1f} s")

# %% [markdown]
# Bir cümlənin tokenlərə necə bölündüyünə baxaq. Hər rəngli qutu bir tokendir, altındakı
# rəqəm onun lüğətdəki nömrəsidir (id), `·` isə tokenin başındakı boşluqdur. Azərbaycan dili
# iltisaqi (agglutinative) dildir: kök + şəkilçilər, ona görə uzun sözlər bir neçə parçaya
# bölünür — çox vaxt kök və şəkilçilər sərhədində.


# %%
def token_view(tok: AzTokenizer, text: str) -> HTML:
    """Each token of `text` as a coloured box with its id underneath."""
    enc = tok.tok.encode(text, add_special_tokens=False)
    boxes = []
    for i, (tid, (a, b)) in enumerate(zip(enc.ids, enc.offsets, strict=True)):
        piece = html.escape(text[a:b].replace(" ", "·")) or "…"  # … = part of one character
        boxes.append(
            f"<span style='display:inline-block;margin:2px;padding:2px 4px;border-radius:4px;"
            f"background:{PALETTE[i % len(PALETTE)]};font-family:monospace;text-align:center'>"
            f"{piece}<br><small style='color:#666'>{tid}</small></span>"
        )
    return HTML(f"<div>{''.join(boxes)}</div><p>{len(enc.ids)} token, {len(text.split())} söz</p>")


SENTENCE = "Azərbaycan dilində sözlər şəkilçilərlə uzanır: gözəlləşdirilmişlərdənsiniz."
display(token_view(tok, SENTENCE))
assert tok.decode(tok.encode(SENTENCE)) == SENTENCE  # tokenizing loses nothing

# %% [markdown]
# **Fertillik (fertility)** — bir sözə orta hesabla neçə token düşür. Nə qədər azdırsa, model
# eyni kontekstə (context) o qədər çox mətn sığdırır və hər söz üçün daha az addım atır. Lüğət
# böyüdükcə fertillik azalır, amma modelin giriş və çıxış cədvəlləri böyüyür. Ədalətli ölçmək
# üçün tokenizatorları FLORES-200 cümlələrindən başqa hər şeydə öyrədib, fertilliyi FLORES
# cümlələrində ölçürük (tokenizatorun görmədiyi mətn).

# %%
from azllm.documents import text_files

files = text_files(CORPUS)
held_out = [f for f in files if "flores" in f.name]
train_files = [f for f in files if f not in held_out]
held_text = list(iter_all_documents(held_out))
n_bytes = sum(len(d.encode("utf-8")) for d in held_text)
n_words = sum(len(d.split()) for d in held_text)

rows = [["baytlar (tokenizatorsuz)", "256", f"{n_bytes / n_words:.2f}", "1.00", "-"]]
for size in [512, 1024, 2048, 4096]:
    candidate = AzTokenizer(train_tokenizer(iter_all_documents(train_files), size))
    s = tokenizer_stats(candidate, held_text)
    rows.append(
        [
            "BPE",
            f"{size:,}",
            f"{s['fertility']:.2f}",
            f"{s['bytes_per_token']:.2f}",
            f"{s['vocab_used'] / s['vocab_size']:.0%}",
        ]
    )
display(table(rows, ["üsul", "lüğət", "token/söz", "bayt/token", "lüğətin işlənən payı"]))
print(f"held-out text: {len(held_text)} FLORES documents, {n_words:,} words, {n_bytes:,} bytes")

# %% [markdown]
# İndi bütün korpusu tokenləşdirib **şardlara** (shards) yazırıq: düz token massivləri, modelin
# oxuduğu format. Sənədlərin 10%-i yoxlama (validation) üçün ayrılır — model onları öyrənmir,
# yalnız onlarda ölçülür.

# %%
meta = tokenize_to_shards(tok, CORPUS, WORK / "data", val_fraction=0.1, progress=False)
for split, info in meta["splits"].items():
    print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens")

# %% [markdown]
# ## 3. Model
#
# azllm-in modeli Llama tipli transformer dekoderdir (decoder-only): token vektorları (embedding),
# bir neçə blok (hər birində diqqət + MLP), sonda hər token üçün növbəti tokenin ehtimalları.
# Aşağıdakı cədvəl `azllm model summary` əmrinin göstərdiyi eyni cədvəldir
# (`GPT.summary_rows`): hər çəki tensorunun adı, forması və parametr sayı.

# %%
from azllm.config import apply_overrides, load_config
from azllm.model import GPT

cfg = apply_overrides(load_config("baby"), {"model.vocab_size": tok.vocab_size, **MODEL, **TRAIN})
model = GPT(cfg.model)
total = model.num_params()
rows = [
    [f"<code>{name}</code>", shape, f"{n:,}", f"{n / total:.1%}"]
    for name, shape, n in model.summary_rows()
]
rows.append(["<b>cəmi (total)</b>", "", f"<b>{total:,}</b>", "100%"])
display(table(rows, ["parametr", "forma", "say", "pay"]))
m = cfg.model
print(
    f"{m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size} tokens; "
    f"{model.flops_per_token() / 1e6:.1f} MFLOP per training token. The output layer shares "
    "its weights with the token embedding (tie_embeddings), so it has no row of its own."
)

# %% [markdown]
# ## 4. Öyrətmə (training) və canlı itki əyrisi
#
# `azllm.train.train` layihənin yeganə öyrətmə döngüsüdür (`azllm train` də onu çağırır). Hər
# addımda model bir paket mətndə növbəti tokeni təxmin edir; **itki** (loss, çarpaz entropiya)
# nə qədər səhv etdiyini ölçür. Təsadüfi təxminin itkisi ln(lüğət ölçüsü)-dür. Öyrətmə arxa
# planda gedir, qrafik isə `metrics.jsonl` faylından oxunub hər saniyə yenilənir. Mavi xətt
# öyrətmə itkisidir, narıncı nöqtələr modelin görmədiyi yoxlama mətnindəki itki: ikisi birlikdə
# düşürsə, model əzbərləmir, öyrənir.

# %%
from azllm.metrics import read_metrics
from azllm.train import train

RUN = WORK / "run"
outcome: dict = {}


def training() -> None:
    try:
        outcome["last"] = train(cfg, WORK / "data", RUN, progress=False)
    except BaseException as e:  # shown in the notebook after the thread ends
        outcome["error"] = e


def draw(fig: Figure, records: list[dict], seconds: float) -> None:
    fig.clear()
    ax = fig.subplots()
    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if tr:
        ax.plot(*zip(*tr, strict=True), label="öyrətmə (train)", color="tab:blue")
    if va:
        ax.plot(*zip(*va, strict=True), "o-", label="yoxlama (validation)", color="tab:orange")
    ax.axhline(math.log(tok.vocab_size), ls="--", color="gray", label="təsadüfi təxmin")
    ax.set_xlim(0, cfg.train.max_steps)
    ax.set_xlabel("addım (step)")
    ax.set_ylabel("itki (loss), nat/token")
    step = tr[-1][0] if tr else 0
    ax.set_title(f"Öyrətmə: addım {step}/{cfg.train.max_steps}, {seconds:.0f} s")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")


fig = Figure(figsize=(7, 4))
worker = threading.Thread(target=training)
start = time.perf_counter()
worker.start()
draw(fig, [], 0)
handle = display(png(fig), display_id=True)  # redrawn in place every second
while worker.is_alive():
    worker.join(timeout=1.0)
    draw(fig, read_metrics(RUN), time.perf_counter() - start)
    handle.update(png(fig))
if "error" in outcome:
    raise outcome["error"]
last = outcome["last"]
print(
    f"{last['step']} steps in {time.perf_counter() - start:.0f} s: train loss {last['loss']:.2f}, "
    f"val loss {last['val_loss']:.2f} = {last['val_bpb']:.2f} bits per byte "
    f"(random guessing: {math.log(tok.vocab_size):.2f})"
)

# %% [markdown]
# ## 5. Diqqət (attention) nəyə baxır?
#
# Hər blokda hər "baş" (head) hər token üçün əvvəlki tokenlərə çəki paylayır: sorğu (query) ilə
# açarın (key) skalyar hasili, softmax. Bu çəkiləri modelin öz modullarından hesablayırıq: bir
# "hook" hər diqqət moduluna girən vektorları tutur, biz də `q_proj`, `k_proj` və RoPE ilə
# çəkiləri yenidən qururuq. Sonra yoxlayırıq ki, bu çəkilərlə hesablanan nəticə modulun öz
# çıxışı ilə eynidir — yəni şəkil həqiqətən modelin etdiyini göstərir.
#
# Kiçik modellərdə tez yaranan bir naxış "əvvəlki token" başıdır: hər token əsasən özündən
# əvvəlkinə baxır. Aşağıda bu naxışı ən güclü olan başı seçib çəkirik. Bir-iki dəqiqəlik
# öyrətmədən sonra naxış hələ zəifdir (pay 1 olsaydı, baş yalnız əvvəlki tokenə baxardı);
# çox vaxt tokenlər həm də ilk tokenə (`<bos>`) baxır — "baxacaq yer olmayanda" istifadə
# olunan bir növ dayanacaq.

# %%
from azllm.checkpoint import load_run
from azllm.model import apply_rope

model, tok, run_cfg = load_run(RUN, weights="best")  # the weights with the lowest val loss
model.eval()
TEXT = "Bakı Azərbaycanın paytaxtı və ən böyük şəhəridir."
ids = [tok.bos_id] + tok.encode(TEXT)
seen: dict[int, tuple] = {}
hooks = [
    block.attn.register_forward_hook(lambda mod, args, out, i=i: seen.update({i: (args, out)}))
    for i, block in enumerate(model.blocks)
]
with torch.no_grad():
    model(torch.tensor([ids]))
for h in hooks:
    h.remove()


def attention_weights(attn, x, rope) -> torch.Tensor:
    """[heads, T, T] attention weights of module `attn` on its input x [1, T, C]."""
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, attn.n_head, attn.head_dim)
    k = attn.k_proj(x).view(b, t, attn.n_kv_head, attn.head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if rope is not None:  # llama: rotary positions; gpt2 has them in the embedding instead
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)  # grouped-query attention
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    causal = torch.ones(t, t, dtype=torch.bool).tril()  # a token sees only itself and the past
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)[0]


weights = {}
with torch.no_grad():
    for i, block in enumerate(model.blocks):
        (x, rope, *_), out = seen[i]
        w = attention_weights(block.attn, x, rope)
        # check: weights @ values through o_proj must give the module's own output
        v = block.attn.v_proj(x).view(1, len(ids), block.attn.n_kv_head, -1).transpose(1, 2)
        v = v.repeat_interleave(block.attn.n_head // block.attn.n_kv_head, dim=1)
        y = block.attn.o_proj((w[None] @ v).transpose(1, 2).reshape(1, len(ids), -1))
        err = (y - out).abs().max().item()
        assert err < 1e-5, err  # measured 7e-7 (fp32 rounding; outputs are ~3.5 in size)
        weights[i] = w

# the head that looks most at the previous token: mean weight on the sub-diagonal
prev = {(i, h): w[h].diagonal(-1).mean().item() for i, w in weights.items() for h in range(len(w))}
layer, head = max(prev, key=prev.get)
print("previous-token score per (layer, head):", {k: round(v, 2) for k, v in prev.items()})

enc = tok.tok.encode(TEXT, add_special_tokens=False)
labels = ["<bos>"] + [TEXT[a:b].replace(" ", "·") or "…" for a, b in enc.offsets]
fig = Figure(figsize=(7.5, 6.5))
ax = fig.subplots()
im = ax.imshow(weights[layer][head].numpy(), cmap="viridis", vmin=0, vmax=1)
ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=9)
ax.set_yticks(range(len(labels)), labels, fontsize=9)
ax.set_xlabel("baxılan token (key)")
ax.set_ylabel("baxan token (query)")
ax.set_title(f"Diqqət: qat {layer}, baş {head} (əvvəlki token payı {prev[layer, head]:.2f})")
fig.colorbar(im, ax=ax, label="diqqət çəkisi (attention weight)")
show(fig)
fig.savefig(WORK / "attention.png", dpi=90, bbox_inches="tight")

# %% [markdown]
# ## 6. Nümunə götürmə (sampling): temperatur, top-k, top-p
#
# Model hər addımda bütün lüğət üzərində ehtimal paylanması verir; növbəti tokeni necə
# seçəcəyimiz mətnin xarakterini dəyişir:
#
# - **temperatur** (temperature) — loqitləri (logits) T-yə bölür: T < 1 paylanmanı kəskinləşdirir
#   (ehtiyatlı, təkrarçı mətn), T > 1 düzləşdirir (cəsarətli, amma tez mənasızlaşan). T = 0 —
#   həmişə ən ehtimallı token (acgöz, greedy).
# - **top-k** — yalnız ən ehtimallı k tokendən seçir.
# - **top-p** (nucleus) — ehtimalları cəmi p-yə çatana qədər ən ehtimallı tokenləri saxlayır.
#
# Əvvəlcə bir prompt üçün növbəti tokenin paylanmasını üç temperaturda müqayisə edək.

# %%
PROMPT = "Azərbaycanın paytaxtı"
with torch.no_grad():
    logits, _ = model(torch.tensor([[tok.bos_id] + tok.encode(PROMPT)]))
logits = logits[0, -1]
top = logits.softmax(-1).topk(12).indices
names = [f"«{tok.decode([int(i)]).replace(' ', '·')}»" for i in top]
fig = Figure(figsize=(8, 4))
ax = fig.subplots()
for j, temp in enumerate([0.5, 1.0, 2.0]):
    p = (logits / temp).softmax(-1)[top]
    where = [i + (j - 1) * 0.27 for i in range(len(top))]  # three bars side by side
    ax.bar(where, p.numpy(), width=0.27, label=f"T = {temp}")
ax.set_xticks(range(len(top)), names, rotation=45, ha="right")
ax.set_xlabel(f"növbəti token: «{PROMPT} …»")
ax.set_ylabel("ehtimal (probability)")
ax.set_title("Temperatur paylanmanı necə dəyişir (ən ehtimallı 12 token)")
ax.legend()
ax.grid(axis="y", alpha=0.3)
show(fig)

# %% [markdown]
# İndi eyni prompt üçün hər üsulla iki nümunə (eyni toxum/seed ilə). Acgöz seçim hər dəfə eyni
# mətni verir; temperatur artdıqca mətn müxtəlifləşir, sonra isə dağılır.

# %%
from azllm.generate import generate
from azllm.sampling import SamplingSettings

START = "Bir gün kiçik bir uşaq"
ways = {
    "acgöz (T = 0)": {"temperature": 0.0},
    "T = 0.7, top-k 50": {"temperature": 0.7, "top_k": 50},
    "T = 1.0, top-p 0.9": {"temperature": 1.0, "top_k": 0, "top_p": 0.9},
    "T = 1.0, kəsmə yoxdur": {"temperature": 1.0, "top_k": 0},
    "T = 1.8, top-k 50": {"temperature": 1.8, "top_k": 50},
}
rows = []
for name, kw in ways.items():
    s = SamplingSettings().override(max_new_tokens=30, seed=0, **kw)
    outs = generate(model, [[tok.bos_id] + tok.encode(START)] * 2, s, eos_id=tok.eos_id)
    rows.append([name, *(f"<i>{esc(START)}</i>{esc(tok.decode(o))}" for o in outs)])
display(table(rows, ["üsul", "nümunə 1", "nümunə 2"]))

# %% [markdown]
# ## 7. Söhbətə öyrətmə (chat fine-tuning, SFT)
#
# Əvvəlcədən öyrədilmiş (pretrained) model mətni davam etdirir, suala cavab vermir. Onu
# söhbətə öyrətmək üçün dialoqlar üzərində bir az da öyrədirik (supervised fine-tuning): hər
# dialoq `<|user|>…<|end|><|assistant|>…<|end|>` şablonuna salınır və itki **yalnız köməkçinin**
# (assistant) tokenlərində hesablanır. Aşağıdakı 20 qısa dialoq bu dəftər üçün yazılıb. Bu qədər
# az data ilə model cavabları çox vaxt əzbərləyir — burada məqsəd üsulu görməkdir; əsl söhbət
# üçün minlərlə dialoq lazımdır (`azllm sft --data ...`).

# %%
from azllm.chat.sft import sft

DIALOGUES = [
    ("Salam!", "Salam! Sizə necə kömək edə bilərəm?"),
    ("Necəsən?", "Yaxşıyam, sağ olun. Siz necəsiniz?"),
    ("Azərbaycanın paytaxtı haradır?", "Azərbaycanın paytaxtı Bakıdır."),
    ("Xəzər nədir?", "Xəzər dünyanın ən böyük qapalı su hövzəsidir."),
    ("Bir həftədə neçə gün var?", "Bir həftədə yeddi gün var."),
    ("İki üstəgəl üç neçə edir?", "İki üstəgəl üç beş edir."),
    ("Çayı necə dəmləyim?", "Çaydanı isti su ilə yaxalayın, çayı tökün və beş dəqiqə dəmləyin."),
    ("Mənə bir atalar sözü de.", "Dostu dar gündə tanıyarlar."),
    ("Kitab oxumaq niyə faydalıdır?", "Kitab söz ehtiyatını artırır və düşünməyi öyrədir."),
    ("Qışda hava necə olur?", "Qışda hava soyuq olur, bəzən qar yağır."),
    ("Sağ ol!", "Dəyməz! Başqa sualınız olsa, buradayam."),
    ("Şəki nə ilə məşhurdur?", "Şəki xan sarayı və şirin paxlavası ilə məşhurdur."),
    ("Novruz nə vaxt qeyd olunur?", "Novruz yazın gəlişi ilə, martın sonlarında qeyd olunur."),
    ("Ən uzun çay hansıdır?", "Azərbaycanda ən uzun çay Kürdür."),
    ("Saat neçədir?", "Bağışlayın, mən saatı bilmirəm, telefonunuza baxın."),
    ("Bir rəng de.", "Yaşıl. Meşələrin və baharın rəngi."),
    ("Futbolda komandada neçə oyunçu olur?", "Meydanda hər komandadan on bir oyunçu olur."),
    ("Günəş hansı tərəfdən doğur?", "Günəş şərqdən doğur, qərbdə batır."),
    ("Sən kimsən?", "Mən azllm ilə öyrədilmiş kiçik bir dil modeliyəm."),
    ("Sağ ol, gecən xeyrə qalsın.", "Sizin də gecəniz xeyrə qalsın!"),
]
with open(WORK / "chat.jsonl", "w", encoding="utf-8") as f:
    for user, assistant in DIALOGUES:
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        f.write(json.dumps({"messages": turns}, ensure_ascii=False) + "\n")

CHAT_RUN = WORK / "chat-run"
t = time.perf_counter()
sft(RUN, [WORK / "chat.jsonl"], CHAT_RUN, epochs=SFT_EPOCHS, overrides={"train.lr": SFT_LR})
print(f"fine-tuned in {time.perf_counter() - t:.0f} s")

# %% [markdown]
# İndi onunla danışaq. Mesajlar eyni şablonla tokenləşdirilir (`encode_chat`), model `<|end|>`
# tokenini yaradanda cavab bitir. Birinci sual öyrətmə dialoqlarındandır, ikincisi yox.

# %%
chat_model, chat_tok, _ = load_run(CHAT_RUN)
chat_model.eval()


def reply(messages: list[dict]) -> str:
    ids, _ = chat_tok.encode_chat(messages, add_generation_prompt=True)
    s = SamplingSettings().override(temperature=0.0, max_new_tokens=40)
    return chat_tok.decode(generate(chat_model, [ids], s, eos_id=chat_tok.end_id)[0]).strip()


def bubble(role: str, text: str) -> str:
    side, color = ("right", "#dbe7fd") if role == "user" else ("left", "#d8f3dc")
    who = "Siz" if role == "user" else "Model"
    return (
        f"<div style='text-align:{side}'><span style='display:inline-block;max-width:70%;"
        f"background:{color};border-radius:10px;padding:4px 10px;margin:3px'>"
        f"<small><b>{who}</b></small><br>{esc(text)}</span></div>"
    )


history: list[dict] = []
for question in ["Azərbaycanın paytaxtı haradır?", "Bakıda hava necədir?"]:
    history.append({"role": "user", "content": question})
    history.append({"role": "assistant", "content": reply(history)})
display(HTML("".join(bubble(m["role"], m["content"]) for m in history)))

# %% [markdown]
# ## 8. Qiymətləndirmə (evaluation)
#
# İtki bir rəqəmdir; modelin suallara cavab verə bilib-bilmədiyini testlər göstərir. azllm ilə
# `az-basic` test dəsti gəlir: altı mövzuda dörd variantlı suallar və qısa cavablı suallar.
# Variantlı sualda hər variantın ehtimalı hesablanır və ən ehtimallısı modelin cavabı sayılır;
# nəticə təsadüfi seçim səviyyəsi (chance) və 95% etibar intervalı ilə verilir. Bir neçə
# dəqiqəlik kiçik modeldən təsadüfi səviyyədən yuxarı nəticə gözləməyin — interval bunu
# göstərir. Hesabat (report card) `RUN/eval/` qovluğuna da yazılır (`azllm eval --tasks`
# ilə eyni).

# %%
from azllm.evaluate.backends import RunBackend
from azllm.evaluate.harness import evaluate_tasks
from azllm.evaluate.report import markdown, wilson
from azllm.evaluate.tasks import BUILTIN

TASKS = "az-basic"  # a built-in name, or a folder / JSONL file of your own questions
if EVAL_PER_FILE:  # a smaller copy with every subject in it: the first questions of each file
    for f in (BUILTIN / "az-basic").rglob("*.jsonl"):
        part = WORK / "az-basic" / f.relative_to(BUILTIN / "az-basic")
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text("".join(f.read_text("utf-8").splitlines(True)[:EVAL_PER_FILE]), "utf-8")
    TASKS = str(WORK / "az-basic")

base_model, base_tok, _ = load_run(RUN, weights="best")
summaries = evaluate_tasks(
    RunBackend(base_model, base_tok), [TASKS], model="walkthrough (base)", out_dir=RUN / "eval"
)
display(Markdown(markdown(summaries)))

mc = next(s for s in summaries if s["kind"] == "mc")
subjects = list(mc["per_subject"])
scores = [mc["per_subject"][s]["score"] for s in subjects]
cis = [wilson(round(v["score"] * v["n"]), v["n"]) for v in mc["per_subject"].values()]
fig = Figure(figsize=(8, 4))
ax = fig.subplots()
lo = [max(sc - ci[0], 0) for sc, ci in zip(scores, cis, strict=True)]  # never below 0 (rounding)
hi = [max(ci[1] - sc, 0) for sc, ci in zip(scores, cis, strict=True)]
ax.bar(subjects, scores, yerr=[lo, hi], capsize=4, color="tab:green", alpha=0.7)
ax.axhline(mc["chance"], ls="--", color="gray", label=f"təsadüfi seçim ({mc['chance']:.0%})")
ax.set_ylim(0, 1)
ax.set_xlabel("mövzu (subject)")
ax.set_ylabel("düzgün cavab payı (accuracy)")
ax.set_title(f"az-basic, variantlı suallar: {mc['n']} sual, 95% interval ilə")
ax.tick_params(axis="x", rotation=30)
ax.legend()
show(fig)

# %% [markdown]
# ## 9. GGUF ixracı və llama.cpp
#
# Öyrədilmiş modeli başqa proqramlarda işlətmək üçün ixrac edirik. **GGUF** llama.cpp-nin (və
# Ollama-nın, LM Studio-nun) fayl formatıdır: bir faylda çəkilər, tokenizator və söhbət şablonu.
# `f32` çəkiləri olduğu kimi saxlayır; `q8_0`, `q4_k_m` kimi növlər faylı kiçildir (kvantlama,
# quantization). Sonra eyni sualı llama.cpp-yə veririk: tokenləri bizimki ilə eyni olmalı və
# acgöz cavabı bizim cavabımızla üst-üstə düşməlidir — deməli, fayl modelin özüdür.
# (llama.cpp konteksti 256-nın misli edir və stderr-ə "n_ctx_seq (256) > n_ctx_train (128)"
# yaza bilər: zərərsizdir, model öz 128 tokenindən artığını görmür.)

# %%
from azllm.evaluate import evaluate_text
from azllm.export.gguf import export_gguf, gguf_eval, quiet_llama_cpp

gguf = export_gguf(CHAT_RUN, WORK / "walkthrough-f32.gguf", "f32")
print(f"{gguf.name}: {gguf.stat().st_size / 1e6:.1f} MB")

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
    print(
        "llama-cpp-python is not installed, so this part is skipped. Install it with\n"
        "    pip install llama-cpp-python      (builds llama.cpp: a few minutes)\n"
        "or pip install 'azllm[gguf]', then run this cell again."
    )

if llama_cpp is not None:
    from azllm.export.llamacpp import greedy, loaded
    from azllm.export.llamacpp import tokenize as llama_tokenize

    question = "Azərbaycanın paytaxtı haradır?"
    prompt = chat_tok.encode_chat([{"role": "user", "content": question}], True)[0]
    n = 16
    ours = generate(chat_model, [prompt], temperature=0.0, max_new_tokens=n)[0]  # no stop
    with quiet_llama_cpp(), loaded(gguf) as llm:  # quiet: llama.cpp logs to stderr
        same_tokens = llama_tokenize(llm, question) == chat_tok.encode(question)
        theirs = greedy(llm, prompt, n)
    agree = sum(a == b for a, b in zip(ours, theirs, strict=False))
    display(
        table(
            [
                ["azllm (PyTorch)", esc(chat_tok.decode(ours))],
                ["llama.cpp (GGUF)", esc(chat_tok.decode(theirs))],
            ],
            ["kim", f"acgöz cavab, {n} token"],
        )
    )
    print(f"llama.cpp tokenizes the question as azllm does: {same_tokens}")
    print(f"llama.cpp result: {agree}/{n} greedy tokens equal to ours")
    assert same_tokens

    # the same number from both: bits per byte of a short text
    sample = WORK / "sample.txt"
    sample.write_text(ORIGINAL, encoding="utf-8")
    ours_bpb = evaluate_text(chat_model, chat_tok, ORIGINAL)["bpb"]
    with quiet_llama_cpp():
        theirs_bpb = gguf_eval(gguf, sample)["bpb"]
    print(f"bits per byte: azllm {ours_bpb:.4f}, llama.cpp {theirs_bpb:.4f}")
    # f32 weights: measured 2e-5 apart relatively (5.3982 vs 5.3981; summation order)
    assert abs(ours_bpb - theirs_bpb) < 1e-3 * ours_bpb

print(f"\nthe whole notebook took {time.perf_counter() - T0:.0f} s")

# %% [markdown]
# ## Sonra nə?
#
# - `FAST = False` edib GPU-da yenidən işlədin: böyük model, uzun öyrətmə — itki əyrisi daha
#   aşağı düşür, nümunələr daha oxunaqlı olur.
# - Öz mətninizi əlavə edin: `azllm corpus build --input mətnlər/ --out korpus/`, sonra
#   `sample_corpus()` əvəzinə o qovluğu verin.
# - Terminaldan eyni zəncir: `azllm quickstart`, `azllm chat --run ...`, `azllm serve`,
#   `azllm export ollama` — README-də hamısı izah olunub.
