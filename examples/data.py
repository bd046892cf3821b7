"""What examples/train_llama_cp.py reads and writes: the model (a Hugging Face checkpoint
directory or a JSON config), the data (a corpus of documents as token ids), each step's batch,
the loss log and the exported checkpoint.

Data sources:

- ``--dataset FILES`` (files or folders): local JSON lines / JSON (field ``--text_field``),
  parquet / CSV (column ``--text_field``) and text files (one document per file, or per
  paragraph / line with ``--text_unit``) through the ``datasets`` library, tokenized with the
  checkpoint's tokenizer (``AutoTokenizer`` of ``--model_name_or_path``), an EOS token after
  every document. Global rank 0 tokenizes first (progress bar; ``datasets`` caches the result),
  then the other ranks read the cache.
- ``--data FILE`` (default: the project's docs): bytes as tokens (vocabulary 256), documents
  are the paragraphs. No tokenizer; used by the smoke runs and the tests.

Batches: ``--packed`` packs whole documents (from a random one on; documents longer than
``--seq_len`` cut into ``--seq_len`` pieces) into each row with transformers'
``DataCollatorWithFlattening``; without it a dataset is the documents back to back cut into
``--seq_len`` chunks, visited in a seeded permutation per epoch, and byte text gives random
windows.
"""
from __future__ import annotations

import copy
import csv
import glob
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

import nxd_cp

DEFAULT_CONFIG = dict(  # a tiny Llama 3.1-style model: GQA and llama3 RoPE scaling
    model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=352,
    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
    rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=131072,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=1024))
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT = {".txt", ".text", ".md", ".rst", ".py", ".c", ".h", ".html", ".tex"}  # read in folders


# --- the model ----------------------------------------------------------------------------------
def build_model(path, seq_len: int):
    """A randomly initialised model of the JSON config ``path`` (default: the tiny Llama)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if path is None:
        spec = dict(DEFAULT_CONFIG)
    else:
        with open(path) as f:
            spec = json.load(f)
    spec["max_position_embeddings"] = max(spec.get("max_position_embeddings", 0), seq_len)
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    config.attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_model(args, config, reference: bool):
    """``(transformed model, unmodified model or None)``: from ``--model_name_or_path`` through
    ``nxd_cp.from_pretrained`` (each rank reads only its own slices of the safetensors), or
    randomly initialised from ``--model_config``. The unmodified model (``reference``, for
    ``--check``) is the same directory loaded by transformers, or a copy before ``transform``."""
    from transformers import AutoModelForCausalLM
    path, kwargs = args.model_name_or_path, dict(vocab_parallel_logits=args.vocab_parallel_logits)
    if path is not None:
        model = nxd_cp.from_pretrained(path, config, torch_dtype=torch.float32, **kwargs)
        ref = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    attn_implementation="sdpa")
               if reference else None)
        return model, ref
    model = build_model(args.model_config, args.seq_len)
    ref = copy.deepcopy(model) if reference else None
    return nxd_cp.transform(model, config, **kwargs), ref


def export(model, out: str, tokenizer_from: Optional[str]) -> None:
    """Write the trained model to ``out`` as a Hugging Face checkpoint with the tokenizer of
    ``tokenizer_from`` (``nxd_cp.save_pretrained``: a collective, every rank calls it)."""
    nxd_cp.save_pretrained(model, out, tokenizer_from=tokenizer_from)


# --- the corpus ---------------------------------------------------------------------------------
@dataclass
class Corpus:
    """Documents back to back: ``tokens`` (1-D integers) and ``bounds`` (increasing offsets:
    every document's start, then the end). ``chunked``: plain rows are aligned ``seq_len``
    chunks (datasets) rather than random windows (byte text)."""
    tokens: torch.Tensor
    bounds: torch.Tensor
    chunked: bool = False

    @property
    def documents(self) -> int:
        return len(self.bounds) - 1


def byte_corpus(path) -> Corpus:
    """The bytes of ``path`` (default: the project's docs) as tokens; documents are the
    paragraphs (split after every blank line)."""
    if path is None:
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
        paths = sorted(glob.glob(os.path.join(root, "docs", "*.md")) +
                       [os.path.join(root, "README.md")])
    else:
        paths = [path]
    data = b"".join(open(p, "rb").read() for p in paths)
    if not data:
        raise ValueError(f"--data {paths} holds no bytes")
    tokens = torch.tensor(list(data), dtype=torch.int64)
    blank = ((tokens[:-1] == 10) & (tokens[1:] == 10)).nonzero().flatten() + 2
    bounds = torch.cat([torch.tensor([0]), blank, torch.tensor([len(tokens)])]).unique()
    return Corpus(tokens, bounds)


def data_files(specs: List[str]) -> Dict[str, List[str]]:
    """builder name ("json", "parquet", "csv", "text") -> files. A folder is walked recursively
    for the data and text extensions (``BUILDERS``, ``TEXT``; hidden entries skipped); a file
    named directly with another extension is read as text."""
    out: Dict[str, List[str]] = {}
    for spec in specs:
        if os.path.isdir(spec):
            paths = [os.path.join(d, f) for d, dirs, fs in sorted(os.walk(spec))
                     if not any(part.startswith(".") for part in os.path.relpath(d, spec)
                                .split(os.sep) if part != ".")
                     for f in sorted(fs) if not f.startswith(".")
                     and os.path.splitext(f)[1].lower() in BUILDERS.keys() | TEXT]
            if not paths:
                raise FileNotFoundError(f"--dataset: no data or text files in {spec}")
        else:
            paths = sorted(glob.glob(spec)) or [spec]
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"--dataset: no file {p}")
            if os.path.getsize(p) == 0:  # no document; datasets 4.8's text builder fails on it
                continue
            ext = os.path.splitext(p)[1].lower()
            out.setdefault(BUILDERS.get(ext, "text"), []).append(p)
    return out


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def dataset_corpus(specs: List[str], tokenizer, text_field: str = "text",
                   text_unit: str = "document", cache_dir: Optional[str] = None) -> Corpus:
    """The documents of ``specs`` tokenized (see the module's docstring). Rank 0 first: the
    others then read ``datasets``' cache (each rank tokenizes if the cache is missed)."""
    import datasets
    import pyarrow.compute as pc

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        datasets.disable_progress_bars()
        dist.barrier()
    parts = []
    for builder, files in data_files(specs).items():
        extra = {"sample_by": text_unit} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train",
                                   cache_dir=cache_dir, **extra)
        field = "text" if builder == "text" else text_field
        if field not in ds.column_names:
            raise ValueError(f"--text_field {field!r} is not a column of {files} "
                             f"(columns: {ds.column_names})")
        ds = ds.select_columns([field])
        parts.append(ds if field == "text" else ds.rename_column(field, "text"))
    if not parts:
        raise ValueError(f"--dataset {specs}: every file is empty")
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(rows):
        return {"ids": [ids + eos for ids in tokenizer(rows["text"])["input_ids"]]}

    ds = ds.map(tokenize, batched=True, remove_columns=["text"], desc="tokenize")
    if rank == 0 and dist.is_initialized():
        dist.barrier()  # the cache is written: the other ranks read it
    column = ds.data.column("ids")
    lengths = torch.tensor(pc.list_value_length(column).to_numpy(zero_copy_only=False))
    tokens = torch.from_numpy(pc.list_flatten(column).to_numpy(zero_copy_only=False)
                              .astype("int32"))  # 4 bytes a token, on every rank
    if len(tokens) == 0:
        raise ValueError(f"--dataset {specs}: no tokens (empty documents?)")
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64),
                        lengths.to(torch.int64).cumsum(0)]).unique()
    return Corpus(tokens, bounds, chunked=True)


# --- batches ------------------------------------------------------------------------------------
def get_batch(corpus: Corpus, step: int, dp_rank: int, batch_size: int, seq_len: int,
              seed: int, packed: bool = False, dp: int = 1) -> Dict[str, torch.Tensor]:
    """The full-sequence batch ``[B, S]`` of one DP rank at one step (same on its CP ranks).

    packed: each row holds whole documents from a random one on, the last cut at the row's end,
    as ``DataCollatorWithFlattening`` builds them; the batch also holds ``"documents"`` (per
    row, the documents' token tensors) for the per-document reference.
    """
    tokens = corpus.tokens
    if len(tokens) <= seq_len:  # a short corpus is repeated
        tokens = tokens.repeat(seq_len // len(tokens) + 2)
        corpus = Corpus(tokens, torch.tensor([0, len(tokens)]), corpus.chunked)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + dp_rank)
    if packed:
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=g)
        return pack_documents(corpus, starts.tolist(), seq_len)
    if corpus.chunked:  # the run's samples, in order over steps, DP ranks and rows
        n = len(tokens) // seq_len
        starts = torch.tensor([chunk_of_sample(((step - 1) * dp + dp_rank) * batch_size + b,
                                               n, seed) * seq_len for b in range(batch_size)])
    else:
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=g)
    ids = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()]).long()
    return {"input_ids": ids, "labels": ids.clone()}


def chunk_of_sample(i: int, n: int, seed: int) -> int:
    """The chunk (of ``n``) of the run's sample ``i``: every chunk once per epoch of ``n``
    samples, in a seeded permutation of each epoch."""
    return int(torch.randperm(n, generator=torch.Generator().manual_seed(seed + i // n))[i % n])


def pack_documents(corpus: Corpus, starts: List[int], seq_len: int) -> Dict[str, object]:
    """Rows of the documents from the one holding each start on (documents longer than
    ``seq_len`` as ``seq_len`` pieces), packed by ``DataCollatorWithFlattening``."""
    from transformers import DataCollatorWithFlattening

    tokens, bounds = corpus.tokens, corpus.bounds
    cuts = [torch.arange(int(a), int(b), seq_len) for a, b in zip(bounds[:-1], bounds[1:])
            if b - a > seq_len]
    if cuts:
        bounds = torch.cat([bounds, *cuts]).unique()
    rows, documents = [], []
    for start in starts:
        d = int(torch.searchsorted(bounds, start, right=True)) - 1
        docs, total = [], 0
        while total < seq_len:
            a, b = int(bounds[d % (len(bounds) - 1)]), int(bounds[d % (len(bounds) - 1) + 1])
            docs.append(tokens[a:min(b, a + seq_len - total)].long())
            total += len(docs[-1])
            d += 1
        rows.append(DataCollatorWithFlattening()([{"input_ids": x.tolist()} for x in docs]))
        documents.append(docs)
    batch = {k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids")}
    return dict(batch, documents=documents)


# --- the loss log -------------------------------------------------------------------------------
class LossLog:
    """One record per logged step (step, loss, learning rate, tokens so far, seconds) in
    ``path``: CSV when it ends in ``.csv``, else JSON lines. Appends when resuming."""
    FIELDS = ("step", "loss", "lr", "tokens", "seconds")

    def __init__(self, path: Optional[str], resume: bool = False):
        self.path, self.file = path, None
        if path:
            self.csv = path.endswith(".csv")
            new = not (resume and os.path.exists(path))
            self.file = open(path, "w" if new else "a", newline="")
            if self.csv and new:
                csv.writer(self.file).writerow(self.FIELDS)

    def write(self, **record) -> None:
        if self.file is None:
            return
        if self.csv:
            csv.writer(self.file).writerow([record[k] for k in self.FIELDS])
        else:
            self.file.write(json.dumps({k: record[k] for k in self.FIELDS}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_loss_log(path: str) -> List[Dict[str, float]]:
    """The records of a loss log (either format) as dicts of floats."""
    with open(path, newline="") as f:
        if path.endswith(".csv"):
            return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        return [json.loads(line) for line in f if line.strip()]
