"""A local Hugging Face folder (Llama or Qwen2) as an azllm run: `azllm import hf PATH --out RUN`.

    PATH/config.json                LlamaForCausalLM | Qwen2ForCausalLM
    PATH/model.safetensors          (or model-0000N-of-0000M.safetensors + its index.json)
    PATH/tokenizer.json             a fast tokenizer, used as it is
    PATH/tokenizer_config.json      special tokens and chat_template (or chat_template.jinja)

The weights are the reverse of export/hf.py's renaming (Qwen2 adds q/k/v biases: model.qkv_bias).
The tokenizer is not ours: it lacks azllm's <|bos|>, <|user|>, ... tokens, and retraining or
growing the vocabulary would change the model. Instead RUN/chat_format.json (tokenizer.py's
ChatFormat) spells our template's roles in the tokenizer's own tokens, read off its chat
template by rendering probe conversations; a tokenizer without a chat template gets azllm's
template with role markers written as text and its EOS as the end of a turn. RoPE: plain, or
Llama 3.1/3.2's "llama3" frequencies (model.rope_scaling). Anything the model would compute
differently (other rope scalings, sliding windows, biases elsewhere, other activations) is
refused in one line naming the config field, never dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from azllm.atomic import atomic_dir, atomic_write_text
from azllm.config import Config, ModelConfig
from azllm.errors import AzllmError
from azllm.tokenizer import CHAT_ROLES, AzTokenizer, ChatFormat

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
DEFAULT_CONTEXT = 4096  # block_size when the model allows more (RoPE tables grow with it)
# Probe contents: plain letters, so no template trims or escapes them.
_PROBE = {"system": "QZSYSTEMQZ", "user": "QZUSERQZ", "assistant": "QZASSISTANTQZ"}
_TEXT_MARKERS_JINJA = (  # azllm's template for a tokenizer with none: role markers as text
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AzllmError(f"{path}: unreadable JSON ({str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise AzllmError(f"{path}: expected a JSON object")
    return data


def read_hf_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise AzllmError(f"{folder}: no such folder; give a Hugging Face model folder")
    if not (folder / "config.json").exists():
        raise AzllmError(f"{folder}: not a Hugging Face model folder (no config.json)")
    return _read_json(folder / "config.json")


LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(hf: dict) -> tuple[float, dict]:
    """(rope_theta, rope_scaling): plain RoPE, or Llama 3.1's "llama3" frequencies."""
    params = hf.get("rope_parameters") or {}
    scaling: dict = {}
    for field, spec in (("rope_parameters", params), ("rope_scaling", hf.get("rope_scaling"))):
        kind = (spec or {}).get("rope_type") or (spec or {}).get("type") or "default"
        if kind == "llama3":
            try:
                scaling = {"rope_type": "llama3", **{k: float(spec[k]) for k in LLAMA3_KEYS}}
                key = "original_max_position_embeddings"  # an int in HF's configs
                scaling[key] = int(scaling[key])
            except (KeyError, TypeError, ValueError) as e:
                raise AzllmError(f"config.json: {field}: llama3 needs {e}") from None
        elif kind != "default":
            raise AzllmError(
                f"config.json: {field}.rope_type = {kind!r} is not implemented (azllm computes "
                "plain RoPE and llama3's)"
            )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), scaling


def model_config_from_hf(hf: dict, context: int = 0) -> ModelConfig:
    """Our ModelConfig for an HF config dict; a field we would compute differently is refused."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise AzllmError(
            f"config.json: architectures = {arch!r} is not supported; azllm imports "
            f"{' and '.join(ARCHITECTURES)}"
        )
    qwen2 = arch == "Qwen2ForCausalLM"

    def need(key: str, ok, what: str) -> None:
        if key in hf and hf[key] is not None and not ok(hf[key]):
            raise AzllmError(f"config.json: {key} = {hf[key]!r} is not supported ({what})")

    need("hidden_act", lambda v: v == "silu", "SwiGLU with silu only")
    need("mlp_bias", lambda v: not v, "no MLP biases")
    need("attention_bias", lambda v: not v, "Llama's attention_bias also biases o_proj")
    need("use_sliding_window", lambda v: not v, "no sliding-window attention")
    need("pretraining_tp", lambda v: v == 1, "tensor-parallel slicing changes the numerics")
    try:
        n_embd, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        mpe = int(hf.get("max_position_embeddings") or DEFAULT_CONTEXT)
        cfg = ModelConfig(
            arch="llama",
            vocab_size=int(hf["vocab_size"]),
            block_size=context or min(mpe, DEFAULT_CONTEXT),
            n_layer=int(hf["num_hidden_layers"]),
            n_head=n_head,
            n_kv_head=int(hf.get("num_key_value_heads") or n_head),
            n_embd=n_embd,
            ffn_hidden=int(hf["intermediate_size"]),
            rope_theta=_rope(hf)[0],
            rope_scaling=_rope(hf)[1],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qwen2,
        )
    except KeyError as e:
        raise AzllmError(f"config.json: no {e.args[0]} (needed to build the model)") from None
    except (TypeError, ValueError) as e:
        raise AzllmError(f"config.json: a size is not a number ({e})") from None
    need("head_dim", lambda v: v == n_embd // n_head, "head_dim must be hidden_size / heads")
    cfg.validate()
    return cfg


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        pickled = any((folder / n).exists() for n in ("pytorch_model.bin", "model.pt"))
        hint = " (pickle files are not read: convert to safetensors)" if pickled else ""
        raise AzllmError(f"{folder}: no model.safetensors{hint}")
    out = {}
    for name in files:
        try:
            with safe_open(str(folder / name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        except (SafetensorError, OSError, RuntimeError) as e:
            raise AzllmError(f"{folder / name}: unreadable ({str(e).splitlines()[0]})") from None
    return out


def rename_weights(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names -> ours (export/hf.py's hf_state_dict, reversed); a tied lm_head is dropped."""
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    proj = [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    proj += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    proj += [f"self_attn.{p}_proj.bias" for p in "qkv"] if cfg.qkv_bias else []
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        names[h + "input_layernorm.weight"] = b + "attn_norm.weight"
        names[h + "post_attention_layernorm.weight"] = b + "mlp_norm.weight"
        for p in proj:
            names[h + p] = b + p.replace("self_attn.", "attn.")
    missing = sorted(set(names) - set(hf_sd))
    if missing:
        raise AzllmError(f"model.safetensors: missing {missing[0]} (and {len(missing) - 1} more)")
    # tied checkpoints may store lm_head anyway; old ones store RoPE tables: both recomputed
    extra = [k for k in set(hf_sd) - set(names) if k != "lm_head.weight" and "rotary_emb" not in k]
    if extra:
        raise AzllmError(
            f"model.safetensors: {sorted(extra)[0]} has no place in this architecture "
            f"({len(extra)} such tensors)"
        )
    return {ours: hf_sd[k] for k, ours in names.items()}


# ---- tokenizer and chat template ------------------------------------------------------------


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: Path, tc: dict) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    t = tc.get("chat_template")
    if isinstance(t, list):  # named templates: the default one
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    if t is None and (folder / "chat_template.json").exists():
        t = _read_json(folder / "chat_template.json").get("chat_template")
    return t


def render_jinja(template: str, messages: list[dict], gen: bool, bos: str, eos: str) -> str:
    """Render a chat template as transformers does (sandboxed Jinja, trim/lstrip blocks)."""
    from datetime import datetime

    try:
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise AzllmError("reading a chat_template needs jinja2: pip install 'azllm[hf]'") from None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = lambda x, indent=None, **k: json.dumps(
        x, ensure_ascii=False, indent=indent
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=gen, bos_token=bos, eos_token=eos
    )


def _between(text: str, a: str, b: str | None) -> str:
    rest = text.split(a, 1)[1]
    return rest if b is None else rest.split(b, 1)[0]


def map_chat_template(template: str, bos: str, eos: str) -> tuple[str, dict, dict]:
    """(start, prefix per role, suffix per role) such that a conversation renders as
    start + prefix[r] + content + suffix[r] ... + prefix["assistant"] (generation prompt), read
    off the template by rendering probe conversations; checked on a longer one."""
    s, u, a = (_PROBE[r] for r in CHAT_ROLES)
    msg = [{"role": r, "content": _PROBE[r]} for r in CHAT_ROLES]

    def render(messages, gen=False):
        return render_jinja(template, messages, gen, bos, eos)

    r_sys, r_user = render(msg[:1]), render(msg[:2])
    r_gen, r_asst = render(msg[:2], gen=True), render(msg)
    head, suffix = r_sys.split(s)[0], {"system": _between(r_sys, s, None)}
    start = bos if bos and head.startswith(bos) else ""
    prefix = {"system": head[len(start) :]}
    prefix["user"] = _between(r_user, s, u).removeprefix(suffix["system"])
    suffix["user"] = _between(r_user, u, None)
    prefix["assistant"] = _between(r_gen, u, None).removeprefix(suffix["user"])
    suffix["assistant"] = _between(r_asst, a, None)
    check = msg + [{"role": "user", "content": "QZU2QZ"}, {"role": "assistant", "content": "QZ"}]
    ours = start + "".join(prefix[m["role"]] + m["content"] + suffix[m["role"]] for m in check)
    if render(check, gen=False) + prefix["assistant"] != ours + prefix["assistant"] or (
        render(check[:-1], gen=True) != ours[: -len("QZ" + suffix["assistant"])]
    ):
        raise ValueError("renders turns differently from start + prefix + content + suffix")
    return start, prefix, suffix


def chat_format(folder: Path, tok: AzTokenizer) -> ChatFormat:
    """The tokenizer's special tokens and its chat template mapped onto our roles."""
    tc = (
        _read_json(folder / "tokenizer_config.json")
        if (folder / "tokenizer_config.json").exists()
        else {}
    )
    stm = folder / "special_tokens_map.json"
    sm = _read_json(stm) if stm.exists() else {}
    eos = _token(tc.get("eos_token")) or _token(sm.get("eos_token"))
    if not eos:
        raise AzllmError(f"{folder}/tokenizer_config.json: no eos_token; add one")
    bos = _token(tc.get("bos_token")) or _token(sm.get("bos_token")) or ""
    pad = _token(tc.get("pad_token")) or _token(sm.get("pad_token")) or eos
    template = _chat_template(folder, tc) or _TEXT_MARKERS_JINJA
    try:
        start, prefix, suffix = map_chat_template(template, bos, eos)
    except Exception as e:  # jinja errors, templates without a system role, odd layouts
        raise AzllmError(
            f"{folder}: chat_template cannot be mapped onto system/user/assistant turns "
            f"({str(e).splitlines()[0][:120]}); delete it to use azllm's"
        ) from None
    # the end of an assistant turn: the first special token of its suffix (else EOS)
    tok.tok.encode_special_tokens = False
    ids = tok.tok.encode(suffix["assistant"], add_special_tokens=False).ids
    tok.tok.encode_special_tokens = True
    specials = {t.content for t in tok.tok.get_added_tokens_decoder().values() if t.special}
    pieces = [tok.tok.id_to_token(i) for i in ids]
    end = next((p for p in pieces if p in specials), eos)
    return ChatFormat(start, prefix, suffix, bos or eos, eos, pad, end, template)


def import_hf(folder: str | Path, out: str | Path, *, context: int = 0, force: bool = False):
    """Write RUN (config.json, tokenizer.json, chat_format.json, model.safetensors) atomically;
    returns (out, ModelConfig)."""
    from tokenizers import Tokenizer

    from azllm.checkpoint import save_weights
    from azllm.export import check_out_dir
    from azllm.model import GPT

    folder, out = Path(folder), Path(out)
    check_out_dir(out, force)
    mcfg = model_config_from_hf(read_hf_config(folder), context)
    if not (folder / "tokenizer.json").exists():
        raise AzllmError(f"{folder}: no tokenizer.json (a fast tokenizer is needed)")
    try:
        raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # tokenizers raises bare Exceptions
        raise AzllmError(f"{folder}/tokenizer.json: unreadable ({str(e)[:120]})") from None
    if raw.get_vocab_size() > mcfg.vocab_size:
        raise AzllmError(
            f"{folder}: tokenizer.json has {raw.get_vocab_size()} tokens but config.json "
            f"vocab_size is {mcfg.vocab_size}"
        )
    probe = AzTokenizer.__new__(AzTokenizer)  # chat_format needs the raw tokenizer only
    probe.tok = raw
    tok = AzTokenizer(raw, None, chat_format(folder, probe))
    sd = rename_weights(read_hf_weights(folder), mcfg)
    with torch.device("meta"):  # no random init of a billion weights only to overwrite them
        model = GPT(mcfg)
    try:
        model.load_state_dict(sd, strict=not mcfg.tie_embeddings, assign=True)
    except RuntimeError as e:
        raise AzllmError(f"{folder}: weights do not fit config.json ({str(e)[:200]})") from None
    if mcfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    with atomic_dir(out, replace=True) as tmp:
        cfg = Config(model=mcfg)
        atomic_write_text(tmp / "config.json", json.dumps(cfg.to_dict(), indent=2))
        tok.save(tmp / "tokenizer.json")
        save_weights(model, tmp / "model.safetensors")
    return out, mcfg
