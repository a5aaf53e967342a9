"""Corpus building: read raw sources, clean, filter, deduplicate and write a training corpus.

Modules: clean (mojibake repair, Azerbaijani normalisation, casing, Cyrillic→Latin),
langid (language identification with fastText lid.176); readers, filters, dedup, pipeline,
wiki and cli sit beside them.
"""
