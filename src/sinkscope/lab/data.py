"""Training data for the lab: document sources and the packing collator.

A *source* yields documents (lists of token ids) from a numpy random generator: the synthetic
Bigram-Backcopy task, or natural text tokenised with a bundled model's tokenizer or one trained here.
Every batch is a pure function of (seed, step), so a resumed run sees exactly the batches it would have.

Packing (Barbero et al. 2025, Table 2) has two switches:

- ``mask``: ``causal`` (tokens see earlier documents of the window) or ``intra_doc`` (a token sees only its
  own document; position ids restart at each document, so a document is computed as if it ran alone);
- ``bos``: ``fixed`` (one <bos> at position 0 of every window, visible to every token even under
  ``intra_doc``) or ``eos`` (documents are written ``<bos> doc <eos>`` back to back and the window starts
  anywhere, so its first token is arbitrary), or ``none`` (``doc <eos>`` back to back: no <bos> anywhere,
  so a first-token sink can only be positional).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..conditions import Condition, parse_condition
from ..errors import SinkscopeError

MASKS = ("causal", "intra_doc")
BOS_MODES = ("fixed", "eos", "none")
INFERENCE_INPUTS = ("bos+text", "text")
LEGACY_INPUTS = {"bos+text": "add", "text": "strip"}  # the lab's names of the two plain conditions


class LabDataError(SinkscopeError):
    """Bad lab data settings (unknown source, unreadable files, too little text)."""


# -- sources ------------------------------------------------------------------------------------------
@dataclass
class Document:
    """A document of known length whose tokens are produced on demand (``tokens(start, stop)``), so packing a
    short window never generates more than it uses."""

    length: int
    tokens: Callable[[int, int], list[int]]


class BigramBackcopy:
    """Guo et al. (2024), "Active-Dormant Attention Heads": a bigram Markov chain over `vocab` tokens,
    except that after a *trigger* token the next token copies the token before the trigger. A head that
    implements the copy has nothing to do on non-trigger tokens: the setting in which sinks form fast.

    Token ids: 0 = <bos>, 1 = <eos>, 2.. = content tokens ``t0 .. t{vocab-1}``; triggers are the first
    ``triggers`` content tokens. The transition matrix is a function of ``world_seed`` only.
    """

    def __init__(self, vocab: int = 64, triggers: int = 3, doc_length: tuple[int, int] = (16, 256),
                 concentration: float = 0.3, world_seed: int = 0) -> None:
        if vocab < triggers + 2 or triggers < 1:
            raise LabDataError("bigram-backcopy needs vocab >= triggers + 2 and at least one trigger")
        self.vocab, self.triggers = int(vocab), int(triggers)
        self.doc_length = (int(doc_length[0]), int(doc_length[1]))
        rng = np.random.default_rng(world_seed)
        self.transitions = rng.dirichlet(np.full(vocab, concentration), size=vocab)
        self._cdf = np.cumsum(self.transitions, axis=1)
        self._cdf[:, -1] = 1.0
        self.bos_id, self.eos_id, self.offset = 0, 1, 2
        self.vocab_size = vocab + 2

    def document(self, rng: np.random.Generator) -> list[int]:
        return self._chain(rng, int(rng.integers(self.doc_length[0], self.doc_length[1] + 1)))

    def _chain(self, rng: np.random.Generator, length: int) -> list[int]:
        uniforms = rng.random(length)
        tokens = [int(uniforms[0] * self.vocab)]
        for i in range(1, length):  # a Markov chain is sequential; draws are vectorised above
            previous = tokens[-1]
            if previous < self.triggers and i >= 2:
                tokens.append(tokens[-2])
            else:
                tokens.append(int(np.searchsorted(self._cdf[previous], uniforms[i], side="right")))
        return [t + self.offset for t in tokens]

    def documents(self, rng: np.random.Generator) -> Iterator[Document]:
        while True:
            length = int(rng.integers(self.doc_length[0], self.doc_length[1] + 1))
            yield Document(length, lambda start, stop: self._chain(rng, stop - start))

    def is_copy_target(self, tokens: list[int] | np.ndarray) -> np.ndarray:
        """bool per position: the token is determined by the backcopy rule (its predecessor is a trigger)."""
        ids = np.asarray(tokens) - self.offset
        out = np.zeros(len(ids), dtype=bool)
        out[2:] = (ids[1:-1] >= 0) & (ids[1:-1] < self.triggers) & (ids[:-2] >= 0)
        return out

    def tokenizer(self) -> Any:
        """A word-level tokenizer for the token names, so checkpoints work with text tools too."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {"<bos>": 0, "<eos>": 1, **{f"t{i}": i + self.offset for i in range(self.vocab)}}
        core = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                       pad_token="<eos>", unk_token="<eos>")


class TextDocuments:
    """Natural text split into documents (paragraphs: blank-line separated), tokenised once.
    ``split`` holds out every ``holdout``-th document for validation and probes."""

    def __init__(self, documents: list[list[int]], bos_id: int, eos_id: int, vocab_size: int,
                 tokenizer: Any = None, min_tokens: int = 8) -> None:
        self.all = [d for d in documents if len(d) >= min_tokens]
        if len(self.all) < 20:
            raise LabDataError(f"only {len(self.all)} documents of >= {min_tokens} tokens: give the lab more text")
        self.bos_id, self.eos_id, self.vocab_size = int(bos_id), int(eos_id), int(vocab_size)
        self._tokenizer = tokenizer
        self.docs = self.all

    def split(self, part: str, holdout: int = 20) -> TextDocuments:
        other = TextDocuments.__new__(TextDocuments)
        other.__dict__.update(self.__dict__)
        keep = (lambda i: i % holdout == 0) if part == "validation" else (lambda i: i % holdout != 0)
        other.docs = [d for i, d in enumerate(self.all) if keep(i)]
        return other

    def documents(self, rng: np.random.Generator) -> Iterator[Document]:
        """Documents in corpus order from a random start (a stream, as a packed corpus reads)."""
        index = int(rng.integers(len(self.docs)))
        while True:
            doc = self.docs[index % len(self.docs)]
            yield Document(len(doc), lambda start, stop, doc=doc: doc[start:stop])
            index += 1

    def document(self, rng: np.random.Generator) -> list[int]:
        return self.docs[int(rng.integers(len(self.docs)))]

    def tokenizer(self) -> Any:
        return self._tokenizer


def split_documents(text: str) -> list[str]:
    parts = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in parts if p]


def read_texts(paths: list[str]) -> str:
    """Concatenated text of files (or directories of .txt files); ``shakespeare`` = the bundled works."""
    chunks = []
    for entry in paths:
        if entry == "shakespeare":
            from ..data.texts import shakespeare_text, shakespeare_works

            chunks.extend(shakespeare_text(work).text for work in shakespeare_works())
            continue
        path = Path(entry).expanduser()
        files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise LabDataError(f"no text at {entry}: give .txt files, a directory of them, or 'shakespeare'")
        chunks.extend(f.read_text(encoding="utf-8", errors="replace") for f in files)
    return "\n\n".join(chunks)


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A small byte-level BPE tokenizer trained on the lab's own text (tokenizers library)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")


def text_source(paths: list[str], tokenizer: str = "train:512", dataset: str | None = None) -> TextDocuments:
    """Natural-text documents from files or a `datasets` dataset (a hub ``name`` or ``name:config``, or a directory
    written by ``save_to_disk``; its ``text`` column, one document per row), tokenised with
    ``train:<vocab>`` (a BPE tokenizer trained here) or a bundled model's tokenizer (e.g. ``smollm2-135m``)."""
    if dataset:
        try:
            import datasets
        except ImportError as error:
            raise LabDataError("reading a dataset needs the 'datasets' package: pip install datasets") from error
        try:
            if Path(dataset).expanduser().is_dir():  # saved with Dataset.save_to_disk
                rows = datasets.load_from_disk(str(Path(dataset).expanduser()))
                if isinstance(rows, datasets.DatasetDict):
                    rows = rows["train"]
            else:
                name, _, config = dataset.partition(":")
                rows = datasets.load_dataset(name, config or None, split="train")
        except Exception as error:  # hub and disk errors come in many types
            raise LabDataError(f"cannot load dataset {dataset!r}: {str(error).splitlines()[0][:200]}") from error
        if "text" not in rows.column_names:
            raise LabDataError(f"dataset {dataset!r} has no 'text' column (columns: {rows.column_names})")
        texts = [str(t) for t in rows["text"] if str(t).strip()]
    else:
        texts = split_documents(read_texts(paths))
    if tokenizer.startswith("train:"):
        tok = train_tokenizer(texts, int(tokenizer.split(":", 1)[1]))
    else:
        from ..models import load

        tok = load(tokenizer).tokenizer
        if tok is None or tok.eos_token_id is None:
            raise LabDataError(f"model {tokenizer!r} has no tokenizer with an eos token")
    bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    return TextDocuments(encoded, bos_id, tok.eos_token_id, len(tok), tok)


# -- packing ------------------------------------------------------------------------------------------
@dataclass
class Packing:
    mask: str = "causal"
    bos: str = "eos"

    def __post_init__(self) -> None:
        if self.mask not in MASKS:
            raise LabDataError(f"packing mask must be one of {MASKS}, not {self.mask!r}")
        if self.bos not in BOS_MODES:
            raise LabDataError(f"packing bos must be one of {BOS_MODES}, not {self.bos!r}")

    @property
    def label(self) -> str:
        return f"{self.mask}/{ {'fixed': 'fixed-bos', 'eos': 'eos-separated', 'none': 'no-bos'}[self.bos]}"


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T] next token; -100 = not scored
    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # bool [B, 1, T, T] for intra-document masking; None = causal
    segments: torch.Tensor  # [B, T] document index within the window (-1 = the fixed <bos>)


def pack_window(documents: Iterator[Document], rng: np.random.Generator, length: int, packing: Packing,
                bos_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One window of ``length + 1`` tokens (inputs and shifted labels) with segment ids and position ids.

    Documents are written ``doc <eos>`` (fixed <bos>, no <bos>) or ``<bos> doc <eos>`` (eos-separated), back
    to back; the window starts at a uniformly random offset of the first one. (For Bigram-Backcopy the chain of a
    document cut this way restarts at the cut: a window never simulates tokens it does not use.)
    """
    fixed = packing.bos == "fixed"
    tokens: list[int] = [bos_id] if fixed else []
    segments: list[int] = [-1] if fixed else []
    segment = 0
    while len(tokens) < length + 1:
        doc = next(documents)
        prefix = [bos_id] if packing.bos == "eos" else []
        wrapped = len(prefix) + doc.length + 1
        start = int(rng.integers(wrapped)) if segment == 0 else 0
        stop = min(wrapped, start + length + 1 - len(tokens))
        piece = prefix[start:stop]
        body_start, body_stop = max(start - len(prefix), 0), min(stop - len(prefix), doc.length)
        if body_stop > body_start:
            piece += doc.tokens(body_start, body_stop)
        if stop == wrapped:
            piece.append(eos_id)
        tokens.extend(piece)
        segments.extend([segment] * len(piece))
        segment += 1
    seg = np.asarray(segments)
    positions = np.arange(length + 1)
    if packing.mask == "intra_doc":
        starts = np.r_[True, seg[1:] != seg[:-1]]
        run_start = np.maximum.accumulate(np.where(starts, np.arange(length + 1), 0))
        positions = np.arange(length + 1) - run_start + (1 if fixed else 0)
        positions[seg == -1] = 0
    return np.asarray(tokens), seg, positions


def intra_document_mask(segments: torch.Tensor, fixed_bos: bool) -> torch.Tensor:
    """bool [B, 1, T, T]: causal, within one document; the fixed <bos> (segment -1) stays visible to all."""
    same = segments[:, :, None] == segments[:, None, :]
    if fixed_bos:
        same = same | (segments[:, None, :] == -1)
    causal = torch.tril(torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool))
    return (same & causal)[:, None]


def make_batch(source: Any, seed: int, step: int, rows: range | list[int], length: int, packing: Packing) -> Batch:
    """Rows ``rows`` of the global batch of step ``step``; row r is a function of (seed, step, r) only, so any
    split of the rows over processes sees the same data."""
    ids, labels, positions, segments = [], [], [], []
    for row in rows:
        rng = np.random.default_rng([seed, step, row])
        tokens, seg, pos = pack_window(source.documents(rng), rng, length, packing, source.bos_id, source.eos_id)
        ids.append(tokens[:-1])
        target = tokens[1:].copy()
        if packing.mask == "intra_doc":  # the next document's first token is not predictable from this one
            target[seg[1:] != seg[:-1]] = -100
        labels.append(target)
        positions.append(pos[:-1])
        segments.append(seg[:-1])
    seg_t = torch.as_tensor(np.stack(segments))
    mask = intra_document_mask(seg_t, packing.bos == "fixed") if packing.mask == "intra_doc" else None
    return Batch(torch.as_tensor(np.stack(ids)), torch.as_tensor(np.stack(labels)),
                 torch.as_tensor(np.stack(positions)), mask, seg_t)


def probe_documents(source: Any, count: int, length: int, seed: int) -> list[list[int]]:
    """A fixed set of single documents of ``length`` content tokens (no <bos>) for the sink metric."""
    rng = np.random.default_rng([seed, 7919])
    out: list[list[int]] = []
    tries = 0
    while len(out) < count:
        doc = source.document(rng)
        tries += 1
        if len(doc) >= length:
            out.append(doc[:length])
        elif tries > 50 * count:
            raise LabDataError(f"the data has too few documents of >= {length} tokens for the probe set")
    return out


def inference_condition(mode: str) -> Condition:
    """An inference input as a condition (`sinkscope.conditions`): ``bos+text`` is ``add``, ``text`` is
    ``strip``; any ``add`` or ``strip`` condition, with an intervention, is taken as it is."""
    try:
        condition = parse_condition(LEGACY_INPUTS.get(mode, mode))
    except SinkscopeError as error:
        raise LabDataError(f"inference input {mode!r}: {error}") from None
    if condition.bos not in ("add", "strip"):
        raise LabDataError(f"inference input must be {' or '.join(INFERENCE_INPUTS)} or a condition starting with "
                           f"add or strip (e.g. add+scale:0.5), not {mode!r}")
    return condition


def with_inference_input(documents: list[list[int]], mode: str, bos_id: int) -> list[list[int]]:
    """The probe documents as the inference input ``mode`` feeds them (with or without a leading <bos>)."""
    if inference_condition(mode).bos == "add":
        return [[bos_id] + d for d in documents]
    return [list(d) for d in documents]
