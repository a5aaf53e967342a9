"""Retrieval-augmented generation: answer from your own documents.

    azllm rag index DOCS... --out INDEX     read, chunk, normalise, index (or add to INDEX)
    azllm rag search INDEX "sual"           the best chunks, with scores and sources
    azllm chat --rag INDEX / serve --rag INDEX   the best chunks go into the prompt

    normalise.py  Azerbaijani-aware terms: NFC, İ→i and I→ı lower-casing, apostrophe suffixes,
                  optional light suffix stripping
    chunk.py      overlapping chunks of whole sentences
    index.py      the index folder (index.json + chunks.sqlite), atomic build, incremental add
    prompt.py     the system turn with numbered sources, trimmed to the context
    evaluate.py   recall@k and answer EM/F1 with and without retrieval (the eval harness)
    cli.py        the `rag` commands and the --rag flags of chat and serve

Why BM25 in SQLite FTS5 and not bm25s (measured by bench/rag_speed.py; bench/README.md, "RAG"):
both rank alike (same recall@k on the bundled question set, both BM25 over the same normalised
terms), and bm25s answers single queries several times faster (6-8x at 8 MB; ~10 ms a query
for FTS5, small next to generating a reply). But FTS5 adds documents to an
existing index in one transaction, at the cost of the new text only (bm25s has no update: its
sparse matrix and IDF are rebuilt from every chunk), that transaction is what makes an add
atomic after a kill, the index stays on disk instead of in memory (peak RSS about half of
bm25s's while building), and it is Python's standard library: no extra to install. Our own
normalisation runs before either engine (FTS5 gets the terms, space-separated, with
`unicode61 remove_diacritics 0`), so casing and suffixes are Azerbaijani in both.
"""
