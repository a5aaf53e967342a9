"""One home per concept, checked by behaviour: flag choices, sampling bounds, the train/val split
rule, the MFU denominators, and files that are closed when read."""

from __future__ import annotations

import argparse
import bz2
import gc
import gzip
import io
import lzma
import math
import struct
import types
import warnings
from pathlib import Path

import pytest
import torch
import zstandard

import azllm.train as train_mod
from azllm import device as device_mod
from azllm.chat.api import ApiError, parse_params
from azllm.chat.dpo import LOSSES
from azllm.cli import build_parser
from azllm.config import PRECISIONS, apply_overrides, load_config
from azllm.corpus.report import SplitWriter
from azllm.documents import iter_all_documents, iter_documents
from azllm.errors import AzllmError
from azllm.metrics import read_metrics
from azllm.model import GPT
from azllm.sampling import SamplingSettings
from azllm.shards import _encode_into
from azllm.tokenizer import KINDS

REPO = Path(__file__).resolve().parents[1]


# ---- choices= are the constants, not copies ------------------------------------------------


def _all_parsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))


def test_every_flag_with_a_constant_takes_its_choices_from_it():
    found = {}
    for path, parser in _all_parsers(build_parser()):
        for action in parser._actions:
            found[(*path, action.dest)] = action.choices
    precisions = {k: v for k, v in found.items() if k[-1] == "precision"}
    # every command that loads a run (chat, serve, generate, eval, pairs ...) and train / sft
    assert len(precisions) >= 6, sorted(precisions)
    for key, choices in precisions.items():
        assert choices is PRECISIONS, (key, choices)  # a retyped list drifts when one is added
    assert found[("tokenizer", "train", "kind")] is KINDS
    assert found[("dpo", "loss")] is LOSSES


# ---- sampling bounds: SamplingSettings.check for the commands and the HTTP API ---------------

PROBES = {
    "temperature": [-0.1, 0.0, 1.0, 2.0, 2.01, 7.0, 100.0, math.nan],
    "top_p": [-1.0, 0.0, 0.5, 1.0, 1.01],
    "top_k": [-1, 0, 5, 10**6],
}


@pytest.mark.parametrize("field", PROBES)
def test_the_api_and_the_commands_accept_the_same_sampling_values(field):
    for value in PROBES[field]:
        try:
            SamplingSettings(**{field: value}).check("--")  # what `azllm generate/chat` run
            command_error = None
        except AzllmError as e:
            command_error = str(e)
        try:
            params = parse_params({field: value})
            api_error = None
        except ApiError as e:
            assert e.status == 400 and e.param == field and e.code == "invalid_value", e
            api_error = e.message
        assert (api_error is None) == (command_error is None), (field, value, api_error)
        if api_error is None:
            assert getattr(params, field) == value
        else:  # one wording: the flag's name differs, the bounds do not
            assert api_error == command_error.replace(f"--{field.replace('_', '-')}", field)


# ---- the train/val split: corpus build and tokenize put a document on the same side --------


def _float_bits(f: float) -> int:
    return struct.unpack("<q", struct.pack("<d", f))[0]


def _bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", b))[0]


def _tokenize_split(text: str, val_fraction: float) -> str:
    """The split `azllm tokenize` (shards._encode_into) gives a document."""
    got = []
    writers = {
        s: types.SimpleNamespace(add=lambda ids, n, s=s: got.append(s)) for s in ("train", "val")
    }
    tok = types.SimpleNamespace(encode_batch=lambda batch: [[1] for _ in batch], eos_id=0)
    _encode_into(tok, [text], writers, None, val_fraction)
    return got[0]


def test_corpus_and_tokenize_split_a_document_alike_at_its_threshold(tmp_path):
    # For each document, find (by bisection over the floats) the smallest val_fraction at which
    # tokenize sends it to val; the corpus writer must agree there and one float below. A
    # separate rule (the 53-bit one the corpus used) differs from in_val in that last float for
    # about half of all documents, so ten documents catch it; at val_fraction 0.05 the two differ
    # for about one document in 10^16.
    writer = SplitWriter(tmp_path, 0.05)
    try:
        for i in range(10):
            text = f"Bakı {i}"
            lo, hi = _float_bits(0.0), _float_bits(1.0)  # train at lo, val at hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _tokenize_split(text, _bits_float(mid)) == "val":
                    hi = mid
                else:
                    lo = mid
            for f, want in ((_bits_float(lo), "train"), (_bits_float(hi), "val")):
                writer.val_fraction = f
                assert writer.split_of(text) == want == _tokenize_split(text, f), (text, f)
    finally:
        writer.close()


def test_a_listed_gpu_logs_mfu_against_its_datasheet_peak(monkeypatch, data_dir, tmp_path):
    measured, vendor = 3e10, 5e11  # FLOP/s; any two different numbers
    monkeypatch.setattr(train_mod, "measure_matmul_peak", lambda device, precision: measured)
    monkeypatch.setattr(train_mod, "datasheet_peak", lambda device, precision: vendor)
    over = {"train.precision": "fp32", "train.compile": "off", "train.max_steps": 4}
    over |= {"train.log_interval": 2, "train.eval_interval": 4, "train.eval_batches": 1}
    cfg = apply_overrides(load_config("tiny"), over)
    train_mod.train(cfg, data_dir, tmp_path / "run", progress=False)
    flops_per_token = GPT(cfg.model).flops_per_token()
    logs = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4]
    for r in logs:  # both from the logged tokens/s, each over its own peak (one process)
        flops_s = flops_per_token * r["tok_per_s"]
        assert r["mfu_vs_datasheet_peak"] == pytest.approx(flops_s / vendor, rel=1e-9), r
        assert r["mfu_vs_measured_peak"] == pytest.approx(flops_s / measured, rel=1e-9), r


@pytest.mark.parametrize(
    "name,key",
    [
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40", "L40"),  # not the L4's peak
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),  # not the SXM card's
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("Tesla T4", "T4"),
        ("NVIDIA T400 4GB", None),  # a small Turing card, not a T4
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_datasheet_peak_takes_the_whole_card_name(monkeypatch, name, key):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    want = device_mod.DATASHEET_PEAKS[key] if key else None
    assert device_mod.datasheet_peak(torch.device("cuda"), "bf16") == want
    assert device_mod.datasheet_peak(torch.device("cuda"), "fp32") is None  # no fp32 figure
    assert device_mod.datasheet_peak(torch.device("cpu"), "bf16") is None


# ---- files are closed when read, not when collected ------------------------------------------


def _resource_warnings(fn) -> list[str]:
    # Recorded, not turned into errors: a file collected while open warns from its __del__,
    # where an error would only reach sys.unraisablehook and the test would pass regardless.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        fn()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_cpuinfo_is_read_and_closed():
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo on this system")
    assert _resource_warnings(device_mod.cpu_has_fast_bf16.__wrapped__) == []


def test_documents_are_read_and_their_files_closed(tmp_path):
    text = "Birinci sənəd.\n\nİkinci sənəd.\n\nÜçüncü sənəd.\n"
    files = {
        "a.txt": text.encode(),
        "b.txt.gz": gzip.compress(text.encode()),
        "c.txt.bz2": bz2.compress(text.encode()),
        "d.txt.xz": lzma.compress(text.encode()),
        "e.txt.zst": zstandard.ZstdCompressor().compress(text.encode()),
        "f.jsonl": b'{"text": "bir"}\n{"text": "iki"}\n',
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    docs: list[str] = []

    def read_all():
        docs.extend(iter_all_documents([tmp_path]))

    def read_first_of_each():  # a reader that stops early drops an open generator
        for name in files:
            it = iter_documents(tmp_path / name)
            docs.append(next(it))
            del it

    assert _resource_warnings(read_all) == []
    assert len(docs) == 5 * 3 + 2
    assert _resource_warnings(read_first_of_each) == []
    assert docs[17:] == ["Birinci sənəd."] * 5 + ["bir"]


def test_the_warning_check_sees_a_file_left_open(tmp_path):
    """The check above can fail: a file opened and dropped unclosed is reported."""
    (tmp_path / "x.txt").write_text("x")
    assert _resource_warnings(lambda: open(tmp_path / "x.txt").read())  # noqa: SIM115
    assert _resource_warnings(lambda: io.TextIOWrapper(open(tmp_path / "x.txt", "rb")).read())
