"""Task files: what `azllm eval --tasks` reads.

A task is a test split (scored) and an optional dev split (few-shot examples). Layouts:
- a JSONL file: one task, test only;
- a folder with test/ (one JSONL per subject, TUMLU's layout) and optionally dev/ (the same
  subjects: shots come from the question's own subject);
- a folder with test.jsonl and optionally dev.jsonl;
- a folder of such folders: one task each (the built-in `az-basic` is mc/ and qa/).
Records:
- multiple choice (TUMLU/MMLU): {"question", "choices": [...], "answer": "A" | 0, "subject"?};
- Belebele: {"flores_passage", "question", "mc_answer1".."mc_answer4", "correct_answer_num": "1"};
- short-answer QA: {"question", "answers": [...]} (or "answer": "text").
A file is multiple choice when any record has choices; every record is then checked as one. A
bad record is an AzllmError naming file:line and the field; so is a record of a file without
choices that looks like multiple choice ("options", or a one-letter answer A-J).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from azllm.documents import jsonl_records
from azllm.errors import AzllmError

BUILTIN = Path(__file__).resolve().parents[1] / "data" / "tasks"
LETTERS = "ABCDEFGHIJ"
MC_ALIASES = ("options", "endings", "candidates")  # other datasets' names for "choices"


@dataclass
class Item:
    """One question. MC: choices and gold index; QA: answers (the first is the reference)."""

    id: str  # "subject/line" within the split, stable across runs (the compare key)
    question: str
    subject: str
    where: str  # file:line, for messages
    choices: list[str] = field(default_factory=list)
    gold: int = -1
    answers: list[str] = field(default_factory=list)
    passage: str | None = None


@dataclass
class Task:
    name: str
    kind: str  # "mc" or "qa"
    test: list[Item]
    dev: list[Item]
    source: str


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise AzllmError(f"{path}: not UTF-8 (byte {e.start}); convert it to UTF-8") from None
    out = []
    for n, rec in jsonl_records(lines, path):
        if not isinstance(rec, dict):
            raise AzllmError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append((n, rec))
    if not out:
        raise AzllmError(f"{path}: no records; a task file has one JSON object per line")
    return out


def _text(rec: dict, key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v.strip():
        raise AzllmError(f"{where}: field '{key}' missing or not a non-empty string")
    return v.strip()


def _gold(answer, n: int, where: str, one_based: bool = False) -> int:
    """Answer as a letter ("A"), an index (0), or Belebele's 1-based number ("1")."""
    if isinstance(answer, bool) or answer is None:
        raise AzllmError(f"{where}: field 'answer' missing; give a letter (A-D) or an index")
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        i = LETTERS.find(answer.strip().upper())
        if i < 0 or i >= n:
            raise AzllmError(
                f"{where}: answer '{answer}' is out of range for {n} choices "
                f"({LETTERS[0]}-{LETTERS[n - 1]})"
            )
        return i
    try:
        i = int(answer) - (1 if one_based else 0)
    except (TypeError, ValueError):
        raise AzllmError(f"{where}: answer {answer!r} is not a letter or an index") from None
    if not 0 <= i < n:
        raise AzllmError(f"{where}: answer {answer!r} is out of range for {n} choices")
    return i


def _mc_item(rec: dict, where: str, subject: str, item_id: str) -> Item:
    if "mc_answer1" in rec:  # Belebele
        choices = [rec.get(f"mc_answer{k}") for k in range(1, 5)]
        if not all(isinstance(c, str) and c.strip() for c in choices):
            raise AzllmError(f"{where}: fields 'mc_answer1'..'mc_answer4' must all be text")
        gold = _gold(rec.get("correct_answer_num"), 4, where, one_based=True)
        passage = _text(rec, "flores_passage", where)
    else:
        choices = rec.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise AzllmError(
                f"{where}: field 'choices' missing or with fewer than 2 entries; "
                'a multiple-choice record needs "choices": ["...", "..."]'
            )
        if len(choices) > len(LETTERS) or not all(isinstance(c, str) for c in choices):
            raise AzllmError(f"{where}: field 'choices' must be 2-{len(LETTERS)} strings")
        gold = _gold(rec.get("answer"), len(choices), where)
        passage = rec.get("passage") if isinstance(rec.get("passage"), str) else None
    return Item(
        id=item_id,
        question=_text(rec, "question", where),
        subject=str(rec.get("subject") or subject),
        where=where,
        choices=[c.strip() for c in choices],
        gold=gold,
        passage=passage,
    )


def _qa_item(rec: dict, where: str, subject: str, item_id: str) -> Item:
    # multiple choice under another name, or a choice letter with nothing to choose from, is
    # refused rather than scored as a short answer ("B" compared with the model's text)
    alias = next((k for k in MC_ALIASES if k in rec), None)
    letter = rec.get("answer") if "answers" not in rec else None
    if alias or (isinstance(letter, str) and len(letter) == 1 and letter in LETTERS):
        found = f"has '{alias}'" if alias else f"answer '{letter}' is a choice letter"
        raise AzllmError(
            f"{where}: field 'choices' missing ({found}); a multiple-choice record needs "
            '"choices": ["...", "..."], a short-answer one "answers": ["..."]'
        )
    answers = rec.get("answers", rec.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        raise AzllmError(f"{where}: field 'answers' missing; a QA record needs \"answers\": [...]")
    return Item(
        id=item_id,
        question=_text(rec, "question", where),
        subject=str(rec.get("subject") or subject),
        where=where,
        answers=[a.strip() for a in answers],
    )


def _is_mc(rec: dict) -> bool:
    return "choices" in rec or "mc_answer1" in rec


def read_split(files: list[Path]) -> tuple[str, list[Item]]:
    """(kind, items) of one split's files (one subject per file, named by the file)."""
    recs = [(f, n, rec) for f in files for n, rec in _read_jsonl(f)]
    kind = "mc" if any(_is_mc(r) for _, _, r in recs) else "qa"
    make = _mc_item if kind == "mc" else _qa_item
    # a file named test/dev is a split, not a subject: its records without "subject" are "all"
    subj = {f: "all" if f.stem in ("test", "dev") else f.stem for f in files}
    return kind, [make(r, f"{f}:{n}", subj[f], f"{f.stem}/{n}") for f, n, r in recs]


def _jsonl_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise AzllmError(f"{folder}: no .jsonl files in it")
    return files


def _task_from_folder(path: Path, name: str) -> Task | None:
    if (path / "test").is_dir():
        test_files = _jsonl_files(path / "test")
        dev_files = _jsonl_files(path / "dev") if (path / "dev").is_dir() else []
    elif (path / "test.jsonl").is_file():
        test_files = [path / "test.jsonl"]
        dev_files = [path / "dev.jsonl"] if (path / "dev.jsonl").is_file() else []
    else:
        return None
    kind, test = read_split(test_files)
    dev_kind, dev = read_split(dev_files) if dev_files else (kind, [])
    if dev_kind != kind:
        raise AzllmError(f"{path}: dev and test hold different kinds of records (MC and QA)")
    return Task(name, kind, test, dev, str(path))


def load_tasks(spec: str) -> list[Task]:
    """The tasks named by --tasks: a built-in name (az-basic), a JSONL file or a folder."""
    path = Path(spec)
    if not path.exists() and (BUILTIN / spec).is_dir():
        path, base = BUILTIN / spec, spec
    else:
        base = path.stem if path.suffix == ".jsonl" else path.name
    if not path.exists():
        names = ", ".join(sorted(p.name for p in BUILTIN.iterdir() if p.is_dir()))
        raise AzllmError(f"--tasks {spec}: no such file or folder, nor a built-in task ({names})")
    if path.is_file():
        kind, test = read_split([path])
        return [Task(base, kind, test, [], str(path))]
    one = _task_from_folder(path, base)
    if one is not None:
        return [one]
    tasks = [
        t
        for sub in sorted(p for p in path.iterdir() if p.is_dir())
        if (t := _task_from_folder(sub, f"{base}-{sub.name}")) is not None
    ]
    if not tasks:
        raise AzllmError(
            f"{path}: no test/ folder (nor test.jsonl); a task folder holds "
            "test/<subject>.jsonl and optionally dev/<subject>.jsonl"
        )
    return tasks


def shots_for(item: Item, dev: list[Item], k: int) -> list[Item]:
    """The first k dev items of the item's subject (TUMLU/MMLU practice), else of the split."""
    if k <= 0:
        return []
    same = [d for d in dev if d.subject == item.subject]
    return (same if len(same) >= k else dev)[:k]
