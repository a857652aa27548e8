"""Corpora, tokenizers and batch samplers (numpy only; no torch.nn here)."""

from routemem.data.corpora import NAMED_CORPORA, Corpus, list_corpora, load_corpus, make_corpus
from routemem.data.dataset import SPLITS, WindowSampler, eval_batches, load_splits, split_bounds
from routemem.data.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    build_tokenizer,
    tokenizer_from_dict,
)

__all__ = [
    "NAMED_CORPORA",
    "SPLITS",
    "ByteTokenizer",
    "CharTokenizer",
    "Corpus",
    "WindowSampler",
    "build_tokenizer",
    "eval_batches",
    "list_corpora",
    "load_corpus",
    "load_splits",
    "make_corpus",
    "split_bounds",
    "tokenizer_from_dict",
]

from routemem.data.mqar import multiquery_ar, multiquery_ar_overwrite, recall_accuracy  # noqa: E402

__all__ += ["multiquery_ar", "multiquery_ar_overwrite", "recall_accuracy"]

from routemem.data.images import ImageSet, make_imageset, select_classes, to_rgb  # noqa: E402
from routemem.data.streams import Stream, StreamBatch, Task, make_stream  # noqa: E402
from routemem.data.vision import limit_classes, list_sources, load_source, split_pretrain_stream  # noqa: E402

__all__ += ["ImageSet", "Stream", "StreamBatch", "Task", "limit_classes", "list_sources", "load_source",
            "make_imageset", "make_stream", "select_classes", "split_pretrain_stream", "to_rgb"]
