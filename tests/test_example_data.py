"""examples/train_llama_cp.py from a Hugging Face checkpoint directory and a JSON lines dataset,
as a newcomer runs it: a tiny Llama saved in several safetensors shards, a BPE tokenizer trained
here on the Python standard library's sources, documents tokenized by ``datasets``; parity of
step 1 with the unmodified model loaded from the same directory, the loss log, the export.
Also the data functions of examples/data.py on their own (no processes)."""
import json
import os
import random
import sys

import pytest
import torch

from test_example import ROOT, run_example
from test_models import make_config

sys.path.insert(0, os.path.join(ROOT, "examples"))
import data  # noqa: E402  examples/data.py

VOCAB = 320  # 256 bytes + merges + <|endoftext|>


def stdlib_texts(n_files: int):
    """The text of ``n_files`` modules of the Python standard library (a corpus nobody here
    wrote), largest first among the top-level modules, deterministic."""
    root = os.path.dirname(os.__file__)
    files = sorted((f for f in os.listdir(root) if f.endswith(".py")),
                   key=lambda f: (-os.path.getsize(os.path.join(root, f)), f))[:n_files]
    return [open(os.path.join(root, f), encoding="utf-8", errors="replace").read()
            for f in files]


def save_tokenizer(texts, vocab_size: int, path) -> None:
    """A byte-level BPE tokenizer trained on ``texts``, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(checkpoint dir, JSON lines file): the model in several shards, its tokenizer, and
    documents of varying length (field ``content``) cut from the standard library."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("hf")
    texts = stdlib_texts(6)
    save_tokenizer(texts, VOCAB, folder / "ckpt")
    config = make_config("llama")
    config.vocab_size = VOCAB
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "ckpt", max_shard_size="150KB")
    rng = random.Random(0)
    docs = []  # 400 documents of 10 to 400 characters (about 100 tokens on average)
    for text in texts:
        while text and len(docs) < 400:
            n = rng.randint(10, 400)
            docs.append(text[:n])
            text = text[n:]
    with open(folder / "docs.jsonl", "w") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "content": doc}) + "\n")
    return folder / "ckpt", folder / "docs.jsonl"


def test_checkpoint_is_sharded(checkpoint):
    ckpt, _ = checkpoint
    assert len(list(ckpt.glob("*.safetensors"))) >= 3
    assert (ckpt / "model.safetensors.index.json").exists()
    assert (ckpt / "tokenizer.json").exists()


@pytest.mark.parametrize("args,exported", [
    # two torchrun runs cover the four paths: TP x CP with packed rows, and PP with ZeRO-1
    # (the export gathers over TP in the first and over the stages in the second)
    (["--tensor_parallel_size", "2", "--context_parallel_size", "2", "--packed",
      "--load_balance", "per_document"], True),
    (["--context_parallel_size", "2", "--pipeline_parallel_size", "2", "--batch_size", "2",
      "--zero1"], True),
], ids=["tp2xcp2-packed", "cp2xpp2-zero1"])
def test_example_trains_from_a_checkpoint_directory(tmp_path, checkpoint, args, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, dataset = checkpoint
    log = tmp_path / ("loss.jsonl" if "--packed" in args else "loss.csv")
    export = ["--save_hf", str(tmp_path / "out")] if exported else []
    summary, out = run_example(
        tmp_path, 4, "--model_name_or_path", str(ckpt), "--dataset", str(dataset),
        "--text_field", "content", "--dataset_cache", str(tmp_path / "cache"),
        "--seq_len", "256", "--steps", "4", "--check", "--loss_log", str(log), *export, *args,
        env_extra={"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    # step 1 equals the unmodified model from the same directory (the project's fp32 tolerances)
    assert summary["loss_rel_err"] <= 1e-5 and summary["grad_rel_err"] <= 1e-4, summary
    assert "PASS parity" in out and "documents" in out
    records = data.read_loss_log(str(log))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["loss"] == pytest.approx(summary["first_loss"], rel=1e-6)
    assert records[-1]["loss"] < records[0]["loss"]  # it trains
    assert 4.5 < records[0]["loss"] < 7.0  # ln(320) = 5.77: the tokenizer's ids, not bytes
    if "--packed" in args:
        assert max(summary["documents_per_row"]) >= 2
    if export:  # transformers loads the export; the trained weights fit the data better
        trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
        original = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        assert trained.state_dict().keys() == original.state_dict().keys()
        tok = AutoTokenizer.from_pretrained(tmp_path / "out")
        ids = tok(open(os.__file__).read()[:4000], return_tensors="pt")["input_ids"][:, :256]
        with torch.no_grad():
            assert (trained(input_ids=ids, labels=ids).loss
                    < original(input_ids=ids, labels=ids).loss)


def test_dataset_corpus_documents_and_chunks(tmp_path, checkpoint):
    """Documents are tokenized with EOS after each; plain batches are aligned chunks that visit
    every chunk once per epoch; packed rows start at a document."""
    ckpt, dataset = checkpoint
    tok = data.load_tokenizer(str(ckpt))
    corpus = data.dataset_corpus([str(dataset)], tok, "content", cache_dir=str(tmp_path))
    lines = [json.loads(x)["content"] for x in open(dataset)]
    assert corpus.documents == len(lines)
    first = corpus.tokens[:corpus.bounds[1]].tolist()
    assert first == tok(lines[0])["input_ids"] + [tok.eos_token_id]
    n = len(corpus.tokens) // 64
    assert sorted(data.chunk_of_sample(i, n, seed=3) for i in range(n, 2 * n)) == list(range(n))
    chunks = corpus.tokens[:n * 64].view(n, 64).long()
    for step, dp_rank, b in [(1, 0, 0), (1, 1, 1), (5, 1, 0)]:  # sample ((step-1)*dp+r)*B+b
        ids = data.get_batch(corpus, step, dp_rank, 2, 64, seed=3, dp=2)["input_ids"]
        i = ((step - 1) * 2 + dp_rank) * 2 + b
        assert torch.equal(ids[b], chunks[data.chunk_of_sample(i, n, seed=3)])
    packed = data.get_batch(corpus, 1, 0, 2, 512, seed=0, packed=True)
    assert packed["input_ids"].shape == (2, 512) and len(packed["documents"]) == 2
    assert all(sum(len(d) for d in row) == 512 for row in packed["documents"])
    with pytest.raises(ValueError, match="not a column"):
        data.dataset_corpus([str(dataset)], tok, "body", cache_dir=str(tmp_path))


def test_text_folders_and_loss_log_formats(tmp_path, checkpoint):
    ckpt, _ = checkpoint
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text("first document\n\nstill the first\n")
    (tmp_path / "corpus" / "sub" / "b.md").write_text("second document\n")
    (tmp_path / "corpus" / "empty.py").write_text("")  # skipped (datasets 4.8 fails on it)
    (tmp_path / "corpus" / "notes.bin").write_bytes(b"\x00\xff")  # not a text extension
    tok = data.load_tokenizer(str(ckpt))
    corpus = data.dataset_corpus([str(tmp_path / "corpus")], tok, cache_dir=str(tmp_path / "c"))
    assert corpus.documents == 2  # one document per text file
    corpus = data.dataset_corpus([str(tmp_path / "corpus")], tok, text_unit="paragraph",
                                 cache_dir=str(tmp_path / "c"))
    assert corpus.documents == 3  # a.txt's two paragraphs, b.md
    for name in ("log.csv", "log.jsonl"):
        log = data.LossLog(str(tmp_path / name))
        log.write(step=1, loss=2.5, lr=1e-3, tokens=512, seconds=0.5)
        log.close()
        log = data.LossLog(str(tmp_path / name), resume=True)
        log.write(step=2, loss=2.25, lr=1e-3, tokens=1024, seconds=1.0)
        log.close()
        assert [(r["step"], r["loss"]) for r in data.read_loss_log(str(tmp_path / name))] == [
            (1, 2.5), (2, 2.25)]
