"""Text corpora for language-model training: sources, tokenizers, token files and batches.

  sources.py      where the text comes from (files, folders, .jsonl/.parquet, the hub, CPython's
                  docs) and how it streams as train / held-out pieces
  tokenizers.py   bytes, a byte-level BPE trained on the train split, or a pretrained tokenizer.json
  preparation.py  the pieces tokenized into a folder of token files (mqa/token_files.py), resumably
  batches.py      a prepared corpus read back (Corpus, load_corpus) and the windows cut from it
  window_order.py the order training visits window starts in without replacement, pass after pass

`python -m mqa.data prepare` prepares a run's corpus ahead of training. This module re-exports
the public names, so `from mqa import data; data.load_corpus(...)` is all a caller needs.
"""

from mqa.data.batches import (SAMPLINGS, Corpus, Tokens, eval_window_starts, eval_windows, load_corpus,
                              train_batch)
from mqa.data.errors import DataError
from mqa.data.preparation import SHARD_TOKENS, prepare
from mqa.data.sources import DroppedRows, Source, find_source, split_text
from mqa.data.tokenizers import (TOKENIZER_FILE, TOKENIZER_NAMES, BpeTokenizer, ByteTokenizer, byte_level_chars,
                                 line_chunks, load_tokenizer, pretrained_tokenizer_file)
from mqa.token_files import file_mode

__all__ = [
    "SAMPLINGS", "Corpus", "Tokens", "eval_window_starts", "eval_windows", "load_corpus", "train_batch",
    "DataError",
    "SHARD_TOKENS", "prepare",
    "DroppedRows", "Source", "find_source", "split_text",
    "TOKENIZER_FILE", "TOKENIZER_NAMES", "BpeTokenizer", "ByteTokenizer", "byte_level_chars", "line_chunks",
    "load_tokenizer", "pretrained_tokenizer_file",
    "file_mode",
]
