"""Hugging Face checkpoint directories: ``nxd_cp.from_pretrained`` (each rank reads its own part)
and ``nxd_cp.save_pretrained`` (gathered to rank 0, written as transformers writes them).

One 4-rank gloo world (tests/cases.py) runs every case. The source: tests/test_models.py's tiny
Llama (2 KV heads) and Mistral (1 KV head, tied embeddings) saved by transformers'
``save_pretrained(dir, max_shard_size="50KB")`` (several shards and an index) with a WordLevel
tokenizer trained here (``tokenizers``). Layouts TP2 x CP2 (plain and FSDP2) and TP1 x CP2 x PP2
(plain and ZeRO-1). Each case: the loaded parameters equal the full model's shards exactly; the
step-1 loss equals the unmodified model's (``from_pretrained(dir)``); after an SGD step at lr 0
the export reloads in transformers with the original weights, bit for bit.

Host memory: a Llama with a 32768-token vocabulary (16.6 MB in fp32) loaded at TP2 x CP2,
anonymous RSS (``/proc/self/status`` RssAnon, sampled every millisecond) measured around
``from_pretrained`` and, as a control, around loading the full state dict then ``transform``.
"""
import json
import os
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from cases import CaseRunner, case_result, wanted_cases
from test_models import make_batch, make_config, model_class

from nxd_cp.testing import run_ranks

pytestmark = [pytest.mark.gloo, pytest.mark.slow]
BIG_VOCAB = 32768


class RssPeak:
    """Peak resident memory (bytes) above the value at entry, sampled every 1 ms:
    ``peak`` anonymous (``RssAnon``: what the rank allocates), ``peak_total`` with file pages
    (``VmRSS``: also the page cache of the safetensors files it maps, shared by the ranks)."""

    def __init__(self):
        self.peak = self.peak_total = 0

    @staticmethod
    def now(field="RssAnon:"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    def _sample(self):
        while not self._stop.wait(0.001):
            self._take()

    def _take(self):
        self.peak = max(self.peak, self.now() - self.base)
        self.peak_total = max(self.peak_total, self.now("VmRSS:") - self.base_total)

    def __enter__(self):
        self.base, self.base_total, self._stop = self.now(), self.now("VmRSS:"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._take()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["the quick brown fox jumps over the lazy dog", "context parallel ring attention"]
    tok.train_from_iterator(text, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def write_source(path, arch, vocab=None, max_shard_size="50KB"):
    """Rank 0 writes the unmodified model (seed 1) and a tokenizer; every rank waits."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        config = make_config(arch)
        if vocab is not None:
            config.vocab_size = vocab
        torch.manual_seed(1)
        model_class(arch)(config).save_pretrained(path, max_shard_size=max_shard_size)
        _tokenizer().save_pretrained(path)
    dist.barrier()


def setup(tp, cp, pp, zero1=False):
    import nxd_cp
    from nxd_cp import parallel_state as ps

    lay = ps.get_layout() if ps.model_parallel_is_initialized() else None
    if lay is None or (lay.tp, lay.cp, lay.pp) != (tp, cp, pp):
        ps.destroy_model_parallel()
    return nxd_cp.neuronx_distributed_config(
        tensor_parallel_size=tp, context_parallel_size=cp, pipeline_parallel_size=pp,
        pipeline_config={"num_microbatches": 2} if pp > 1 else None,
        optimizer_config={"zero_one_enabled": zero1, "grad_clipping": False},
        context_parallel_config={"comm_type": "p2p"})


def _exact_shards(model, ref_sd):
    """Names of this rank's tensors that differ from the full model's shard (bit for bit)."""
    from nxd_cp.tensor_parallel.partition import Partition, partitions, shard_of

    parts = partitions(model)
    return [n for n, v in model.state_dict().items()
            if not torch.equal(v, shard_of(parts.get(n, Partition()), ref_sd[n]))]


def roundtrip_case(root, arch, tp, cp, pp, fsdp=False, zero1=False):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import nxd_cp

    src, out = Path(root) / "src", Path(root) / "out"
    write_source(src, arch)
    cfg = setup(tp, cp, pp, zero1)
    with RssPeak() as rss:
        model = nxd_cp.from_pretrained(src, cfg)
    ref = model_class(arch).from_pretrained(src)  # the unmodified model, fp32
    ref_sd = {n: t.clone() for n, t in ref.state_dict().items()}
    res = {"differ": _exact_shards(model, ref_sd), "read": model.nxd_cp_checkpoint,
           "rss": rss.peak, "local_bytes": sum(t.numel() * t.element_size() for t in {
               t.data_ptr(): t for t in model.state_dict().values()}.values()),
           "shards": len(list(src.glob("model-*-of-*.safetensors")))}
    if fsdp:
        model = nxd_cp.fully_shard(model)
    full = make_batch(100)
    mine = nxd_cp.get_batch_on_this_context_parallel_rank(full, config=model)
    if zero1:
        opt = nxd_cp.initialize_parallel_optimizer(cfg, torch.optim.SGD, model.parameters(),
                                                   lr=0.0)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
    if pp > 1:
        res["loss"] = model.run_train(**mine).item()
    else:
        loss = model(**mine).loss
        loss.backward()
        if not fsdp:
            nxd_cp.allreduce_context_parallel_gradients(model)
        res["loss"] = loss.item()
    opt.step()
    nxd_cp.save_pretrained(model, out, max_shard_size="50KB")
    if dist.get_rank() == 0:
        with torch.no_grad():
            res["ref_loss"] = ref(**full).loss.item()
        back = AutoModelForCausalLM.from_pretrained(out)
        res["class"] = type(back).__name__
        res["attn"] = back.config._attn_implementation
        res["config_text"] = (out / "config.json").read_text()
        got = back.state_dict()
        res["export_differ"] = sorted(n for n in ref_sd if not torch.equal(got[n], ref_sd[n]))
        res["export_keys"] = sorted(got) == sorted(ref_sd)
        res["out_shards"] = len(list(out.glob("model-*-of-*.safetensors")))
        res["index"] = (out / "model.safetensors.index.json").is_file()
        res["vocab_equal"] = (AutoTokenizer.from_pretrained(out).get_vocab()
                              == AutoTokenizer.from_pretrained(src).get_vocab())
    return res


def memory_case(root):
    """Peak RSS while loading at TP2 x CP2: from_pretrained vs the full state dict on every rank
    (copied out of the files, as a ``torch.load``-ed checkpoint is) then ``transform``."""
    from safetensors.torch import load_file
    from transformers.integrations.accelerate import init_empty_weights

    import nxd_cp

    src, warm = Path(root) / "src", Path(root) / "warm"
    write_source(src, "llama", vocab=BIG_VOCAB, max_shard_size="6MB")
    write_source(warm, "llama")
    cfg = setup(2, 2, 1)
    nxd_cp.from_pretrained(warm, cfg)  # imports and caches first (tiny model: no big frees)
    with RssPeak() as rss:
        model = nxd_cp.from_pretrained(src, cfg)
    res = {"rss": rss.peak, "rss_total": rss.peak_total, "read": model.nxd_cp_checkpoint,
           "local_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    with RssPeak() as rss:  # control (model kept: its freed memory is not reused here)
        full = {k: t.clone() for f in sorted(src.glob("*.safetensors"))
                for k, t in load_file(f).items()}
        res["full_bytes"] = sum(t.numel() * t.element_size() for t in full.values())
        config = make_config("llama")
        config.vocab_size = BIG_VOCAB
        with init_empty_weights():
            meta = model_class("llama")(config)
        nxd_cp.transform(meta, cfg, state_dict=full)
    res["control_rss"], res["control_rss_total"] = rss.peak, rss.peak_total
    return res


def errors_case(root):
    """from_pretrained on broken directories: every rank raises the same ValueError."""
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    import nxd_cp

    cfg = setup(2, 2, 1)
    lacking, mismatch, empty = (Path(root) / d for d in ("lacking", "mismatch", "empty"))
    write_source(lacking, "llama", max_shard_size="10MB")
    write_source(mismatch, "llama", max_shard_size="10MB")
    if dist.get_rank() == 0:
        weights = load_file(lacking / "model.safetensors")
        del weights["model.layers.1.mlp.down_proj.weight"]
        save_file(weights, lacking / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((mismatch / "config.json").read_text())
        config["intermediate_size"] = 96  # the checkpoint's MLP weights are 128 wide
        (mismatch / "config.json").write_text(json.dumps(config))
        empty.mkdir()
    dist.barrier()
    errors = {}
    for key, path in (("lacking", lacking), ("mismatch", mismatch), ("empty", empty)):
        try:
            nxd_cp.from_pretrained(path, cfg)
            errors[key] = None
        except ValueError as e:
            errors[key] = str(e)
    return errors


CASES = {  # grouped by layout (parallel state is built once per layout)
    "tp2cp2-llama": (roundtrip_case, ("llama", 2, 2, 1), {}),
    "tp2cp2-mistral": (roundtrip_case, ("mistral", 2, 2, 1), {}),
    "tp2cp2-fsdp-llama": (roundtrip_case, ("llama", 2, 2, 1), {"fsdp": True}),
    "memory-tp2cp2-llama": (memory_case, (), {}),
    "errors-tp2cp2-llama": (errors_case, (), {}),
    "tp1cp2pp2-llama": (roundtrip_case, ("llama", 1, 2, 2), {}),
    "tp1cp2pp2-mistral": (roundtrip_case, ("mistral", 1, 2, 2), {}),
    "tp1cp2pp2-zero1-mistral": (roundtrip_case, ("mistral", 1, 2, 2), {"zero1": True}),
}
ROUNDTRIPS = [k for k, v in CASES.items() if v[0] is roundtrip_case]


def world(rank, world_size, wanted, root):
    runner = CaseRunner(wanted)
    for key, (fn, args, kwargs) in CASES.items():
        runner.run(key, fn, os.path.join(root, key), *args, **kwargs)
    return runner.results


@pytest.fixture(scope="module")
def four(request):
    with tempfile.TemporaryDirectory() as root:
        yield run_ranks(world, 4, wanted_cases(request, "four"), root, timeout=900)


@pytest.mark.parametrize("case", ROUNDTRIPS)
def test_from_pretrained_and_save_pretrained(four, case):
    per_rank = case_result(four, case)
    r0 = per_rank[0]
    assert r0["shards"] >= 3, r0["shards"]  # the source is sharded (50KB shards + index)
    for r in per_rank:
        assert r["differ"] == [], r["differ"]  # each rank's parameters: the exact shards
        # exactly this rank's tensors were read, no more (bytes of the fp32 checkpoint)
        assert r["read"]["bytes_read"] == r["local_bytes"], (r["read"], r["local_bytes"])
        # fp32, same weights: only the order of sums differs (CP/TP reductions) -> 1e-5
        assert abs(r["loss"] - r0["ref_loss"]) <= 1e-5 * abs(r0["ref_loss"]), (r, r0)
    # the export at lr 0: transformers loads the original weights, bit for bit, same keys
    assert r0["export_differ"] == [] and r0["export_keys"], r0["export_differ"]
    assert r0["class"] == model_class(case.split("-")[-1]).__name__
    assert r0["attn"] != "nxd_cp" and "nxd_cp" not in r0["config_text"]
    assert r0["out_shards"] >= 3 and r0["index"]
    assert r0["vocab_equal"]  # the source's tokenizer, copied
    print(f"{case}: loss {r0['loss']:.6f} vs {r0['ref_loss']:.6f}; read per rank "
          f"{[r['read']['bytes_read'] for r in per_rank]} B")


def test_from_pretrained_host_memory(four):
    per_rank = case_result(four, "memory-tp2cp2-llama")
    full = per_rank[0]["full_bytes"]
    for r in per_rank:
        # read from disk: this rank's TP half, at most one tensor's part at a time (exact)
        assert r["read"]["bytes_read"] == r["local_bytes"] < 0.55 * full, (r, full)
        assert r["read"]["largest_read"] <= BIG_VOCAB * 64 * 4 // 2, r["read"]
        # measured: the peak anonymous RSS of loading stays below the full model (tp = 2:
        # about half of it plus one tensor's part); the control holds the full model
        assert r["rss"] < full, (r["rss"], full)
        assert r["control_rss"] > full, (r["control_rss"], full)

    def mib(key):
        return [round(r[key] / 2**20, 1) for r in per_rank]

    print(f"full model {full / 2**20:.1f} MiB; peak RSS per rank of from_pretrained: anonymous "
          f"{mib('rss')} MiB, with file pages {mib('rss_total')} MiB; full model then "
          f"transform: anonymous {mib('control_rss')}, with file pages "
          f"{mib('control_rss_total')} MiB")


def test_from_pretrained_errors(four):
    for errors in case_result(four, "errors-tp2cp2-llama"):
        assert "model.layers.1.mlp.down_proj.weight" in errors["lacking"], errors
        assert "lacks 1 tensors" in errors["lacking"], errors
        assert "mlp.gate_proj.weight" in errors["mismatch"], errors
        assert "(128, 64)" in errors["mismatch"] and "(48, 64)" in errors["mismatch"], errors
        assert "model.safetensors" in errors["empty"], errors
