"""sparsify streams the model: peak RSS stays below half the size of a 1.5 GB checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsezip.checkpoint import ShardedWriter

HIDDEN, MLP, LAYERS = 1024, 2816, 60  # 12.8M weights a layer: 1.54 GB of fp16 in all
# Runs a command and prints the largest resident size of its process tree (the command's own children are
# waited for by it, so RUSAGE_CHILDREN of this wrapper is the command's peak), in KiB.
PEAK_RSS = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def write_big_model(folder: Path, tokenizer_from: Path) -> int:
    """A random Llama-style checkpoint written layer by layer (never whole in memory); returns its bytes."""
    folder.mkdir()
    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=HIDDEN,
                  intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=8,
                  max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
                  torch_dtype="float16", bos_token_id=0, eos_token_id=2)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    g = torch.Generator().manual_seed(0)
    writer = ShardedWriter(folder, "model", 2**40)
    total = 0

    def add(name: str, *shape: int) -> None:
        nonlocal total
        t = (torch.randn(*shape, generator=g) * 0.05).half() if len(shape) == 2 else torch.ones(shape).half()
        writer.add(name, t)
        total += t.numel() * 2

    add("model.embed_tokens.weight", vocab, HIDDEN)
    add("model.norm.weight", HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            add(p + f"self_attn.{name}.weight", HIDDEN, HIDDEN)
        add(p + "mlp.gate_proj.weight", MLP, HIDDEN)
        add(p + "mlp.up_proj.weight", MLP, HIDDEN)
        add(p + "mlp.down_proj.weight", HIDDEN, MLP)
        add(p + "input_layernorm.weight", HIDDEN)
        add(p + "post_attention_layernorm.weight", HIDDEN)
    writer.close()
    return total


@pytest.fixture(scope="module")
def big_sparsified(tmp_path_factory, text_file, tiny_dir):
    """A 1.5 GB random checkpoint sparsified by the command line into 0.5 GB shards, its input deleted (disk):
    (W16A16S folder, model bytes, sparsify's peak RSS in bytes). Made once for both streaming tests."""
    root = tmp_path_factory.mktemp("big")
    model_bytes = write_big_model(root / "big", tiny_dir("llama"))
    command = [sys.executable, "-m", "sparsezip", "-q", "sparsify", "--model_path", str(root / "big"),
               "--save_path", str(root / "s"), "--method", "wanda", "--calib", str(text_file),
               "--calib_samples", "2", "--calib_seqlen", "32", "--part_file_size", "0.5"]
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    shutil.rmtree(root / "big")
    return root / "s", model_bytes, int(result.stdout.split()[-1]) * 1024


@pytest.mark.slow
def test_sparsify_peak_memory_is_below_half_the_model(big_sparsified):
    folder, model_bytes, peak = big_sparsified
    assert model_bytes > 1.5e9
    shards = sorted(folder.glob("quant_model_weights-*-of-*.safetensors"))
    assert len(shards) >= 3 and (folder / "quant_model_weights.safetensors.index.json").is_file()
    assert all(p.stat().st_size <= 0.5 * 2**30 for p in shards)
    assert peak < model_bytes / 2, f"peak RSS {peak / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model"


# Peak resident growth of one pruner call on an [in, in] Hessian, in copies of that Hessian (the caller's H not
# counted). At 7B the down projection's Hessian is 18944^2 fp32 = 1.4 GB, so every copy counts.
PRUNER_PEAK = """
import sys, psutil, torch
from sparsezip.pruners import LinearStats, METHODS
n, method = int(sys.argv[1]), METHODS[sys.argv[2]].prune
def stats_of(size):
    s = LinearStats(size, "cpu", hessian=True)
    h = torch.empty(size, size)
    h.fill_(0.01)
    h.diagonal().add_(2.0)
    s.H = h
    return s
method(torch.randn(8, 256), stats_of(256), 0.5, None)  # libraries loaded and warmed up on a small matrix
stats, w = stats_of(n), torch.randn(16, n)
stats.last_use = sys.argv[3] == "last"  # the pruner may then take over H and overwrite it
with open("/proc/self/clear_refs", "w") as f:  # the high-water mark restarts from here (Linux >= 4.0)
    f.write("5")
before = psutil.Process().memory_info().rss
method(w, stats, 0.5, None)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) * 1024
print((peak - before) / (n * n * 4))
"""


@pytest.mark.parametrize("method, use, copies", [("float_sparse", "shared", 1.75), ("sparsegpt", "shared", 1.75),
                                                ("float_sparse", "last", 0.75), ("sparsegpt", "last", 0.75)])
def test_hessian_pruners_hold_few_copies_of_the_hessian(method, use, copies):
    """Copies beyond H while it is shared with later calls (q, k, v): one working copy, and on its last use, where
    H is taken over: none, the factorisations overwrite it (inplace_linalg). torch's own linalg functions held
    2-3 more."""
    result = subprocess.run([sys.executable, "-c", PRUNER_PEAK, "3072", method, use], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    used = float(result.stdout.split()[-1])
    print(f"{method}, {use} Hessian: grew by {used:.2f} copies")
    assert used < copies, f"{method} grew by {used:.2f} copies of its Hessian"


# Peak resident growth of float_sparse on a wide linear, in [in, out] fp32 matrices: at the 7B's down projection
# (18944 inputs, 3584 outputs) each is 0.25 GiB and the Hessian's inverse 1.34 GiB on top. glibc's mmap threshold
# is pinned so that freed blocks of this size go back to the system, as the 7B's 0.25 GiB ones always do.
ITERATE_PEAK = """
import sys, psutil, torch
from sparsezip.pruners import LinearStats, float_sparse
n, out, pattern, row_masks = 512, 32768, {"24": (2, 4)}.get(sys.argv[1]), sys.argv[1] == "row"
def stats_of(size):
    s = LinearStats(size, "cpu", hessian=True)
    h = torch.full((size, size), 0.01)
    h.diagonal().add_(2.0)
    s.H = h
    s.last_use = True
    return s
float_sparse(torch.randn(8, 256).half(), stats_of(256), 0.5, None)  # libraries loaded and warmed up
w, stats = (torch.randn(out, n) * 0.1).half(), stats_of(n)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = psutil.Process().memory_info().rss
float_sparse(w, stats, 0.5, pattern, row_masks=row_masks)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) * 1024
print((peak - before) / (n * out * 4))
"""


@pytest.mark.parametrize("mask", ["whole", "row", "24"])
def test_float_sparse_holds_its_iterates_and_little_more(mask):
    """Four ADMM iterates, the mask and the selection's working set (two more masks). A fifth iterate, a flattened
    copy of the score, a running count of its ties and whole-matrix top-k indices (8 bytes an entry each) and an
    fp32 copy of the layer took it to 8.4-11.1."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    result = subprocess.run([sys.executable, "-c", ITERATE_PEAK, mask], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    used = float(result.stdout.split()[-1])
    print(f"float_sparse, {mask} mask: grew by {used:.2f} [in, out] matrices")
    assert used < 5.75, f"float_sparse grew by {used:.2f} [in, out] matrices"


def mappings_of(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of `path` (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


# Frees a 24 MiB block (glibc then serves blocks below 24 MiB from its heap), allocates ten 8 MiB blocks each
# followed by a 1 MiB one that stays (too large for a hole left by the imports, so it lands after its 8 MiB
# block), frees the 8 MiB ones and prints how many MiB stayed resident: 10 for the live blocks, or 90.
HEAP_KEPT = """
import sys, torch
from sparsezip.checkpoint import map_large_allocations
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
if sys.argv[1] == "map":
    map_large_allocations()
freed = torch.ones(6 << 20)
del freed
before = rss()
kept = [pair[1] for pair in [(torch.ones(2 << 20), torch.ones(1 << 18)) for _ in range(10)]]
print((rss() - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_sparsify_maps_large_blocks_so_freeing_them_returns_their_memory():
    """The setting the sparsify command makes (map_large_allocations): freed 8 MiB blocks between live 1 MiB ones
    leave no resident memory behind. Without it glibc keeps them, which the second run checks, so the first can
    fail."""
    kept = {}
    for mode in ("map", "default"):
        result = subprocess.run([sys.executable, "-c", HEAP_KEPT, mode], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        kept[mode] = float(result.stdout)
    assert kept["map"] < 20 and kept["default"] > 60, kept


def test_mapped_tensor_equals_the_read_one_and_never_writes_the_file(tmp_path):
    from safetensors.torch import save_file

    from sparsezip.checkpoint import TensorReader

    tensors = {"a": torch.randn(7, 5).half(), "b": torch.randn(3, 4).bfloat16(), "c": torch.randn(6)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    before = path.read_bytes()
    reader = TensorReader([path])
    for name, want in tensors.items():
        got = reader.mapped(name)
        assert got.dtype == want.dtype and torch.equal(got, want)
        got.zero_()  # copy-on-write: the file keeps its bytes
    assert path.read_bytes() == before


def test_mapping_a_file_truncated_after_opening_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from sparsezip.checkpoint import TensorReader
    from sparsezip.errors import SparsezipError

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(64, 64).half()}, path)
    reader = TensorReader([path])
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(SparsezipError, match="cannot be mapped for a"):
        reader.mapped("a")


def test_reading_rows_gives_those_rows_of_the_tensor(tmp_path):
    from safetensors.torch import save_file

    from sparsezip.checkpoint import TensorReader

    tensors = {"t": torch.randn(10, 3, 4).half(), "v": torch.randn(7), "s": torch.tensor(2.0)}
    save_file(tensors, tmp_path / "t.safetensors")
    reader = TensorReader([tmp_path / "t.safetensors"])
    for rows in (slice(0, 5), slice(5, 10), slice(3, 4), slice(8, 20), slice(4, 4), slice(None)):
        assert torch.equal(reader.get("t", rows=rows), tensors["t"][rows])
    assert torch.equal(reader.get("v", rows=slice(2, 6)), tensors["v"][2:6])
    with pytest.raises(ValueError):
        reader.get("t", rows=slice(0, 10, 2))


@pytest.mark.parametrize("tp", [2, 4])
def test_compress_reads_only_its_ranks_rows_of_a_row_split_table(tiny_dir, tmp_path, monkeypatch, tp):
    """A rank's share of the embedding table and lm_head, read as just those rows: reading the whole table to
    cut it held it twice at once (1 GB plus the rank's copy at 7B, above compress's target)."""
    from sparsezip.checkpoint import TensorReader
    from sparsezip.compress import Source
    from sparsezip.config import SparsifyConfig
    from sparsezip.sparsify import sparsify
    from sparsezip.tp import all_rules, shard

    folder = sparsify(tiny_dir("llama"), tmp_path / "s", SparsifyConfig(method="magnitude", sparsity=0.5))
    src = Source.open(folder)
    whole = []
    real_get = TensorReader.get
    monkeypatch.setattr(TensorReader, "get", lambda self, name, rows=None: (rows is None and whole.append(name))
                        or real_get(self, name, rows))
    row_split = [r for r in all_rules(src.args) if r.dim == 0 and len(r.sources) == 1]
    assert any(r.target == "model.embed_tokens.weight" for r in row_split)
    for rule in row_split:
        for rank in range(tp):
            whole.clear()
            got = src.read_shard(rule, rank, tp)
            assert whole == []
            assert torch.equal(got, shard(rule, src.read, rank, tp))


def test_reading_a_file_truncated_after_opening_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from sparsezip.checkpoint import TensorReader
    from sparsezip.errors import SparsezipError

    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.randn(64, 64).half(), "b": torch.randn(8).half()}
    save_file(tensors, path)
    reader = TensorReader([path])
    assert all(torch.equal(reader.get(name), t) for name, t in tensors.items())
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(SparsezipError, match="was truncated while reading"):
        [reader.get(name) for name in tensors]


@pytest.mark.parametrize("kind", ["dense", "w16a16sc"])
def test_cpu_runtime_maps_the_embedding_table_from_its_file(kind, tiny_dir, tmp_path):
    """One embedding row is read per token: the table is a memory map of the weights file, not a copy, so rows no
    token uses never take memory."""
    from sparsezip.compress import compress
    from sparsezip.config import SparsifyConfig
    from sparsezip.runtime import load_model
    from sparsezip.sparsify import sparsify

    folder = tiny_dir("llama", tie_word_embeddings=False)
    if kind == "w16a16sc":
        sparse = sparsify(folder, tmp_path / "s", SparsifyConfig(method="magnitude", sparsity=0.5))
        compress(sparse, tmp_path / "sc", tp=1)
        folder = tmp_path / "sc"
    files = sorted(folder.rglob("*.safetensors"))
    model = load_model(folder, "cpu", weights="dense")
    table = model.model.embed_tokens.weight
    assert table.dtype == torch.float16
    ranges = [r for f in files for r in mappings_of(f)]
    assert any(lo <= table.data_ptr() < hi for lo, hi in ranges), "the embedding table is not memory-mapped"
    head = model.lm_head.weight  # untied: read whole every step, so it is held, not mapped
    assert not any(lo <= head.data_ptr() < hi for lo, hi in ranges)


def test_a_tied_embedding_table_is_held_not_mapped(tiny_dir):
    """Tied, the table is the lm_head too, read whole every step: held in memory like the other matrices."""
    from safetensors import safe_open

    from sparsezip.runtime import load_model

    folder = tiny_dir("llama", tie_word_embeddings=True)
    files = sorted(folder.rglob("*.safetensors"))
    model = load_model(folder, "cpu", weights="dense")
    table = model.model.embed_tokens.weight
    ranges = [r for f in files for r in mappings_of(f)]
    assert table.dtype == torch.float16
    assert not any(lo <= table.data_ptr() < hi for lo, hi in ranges), "the tied table is still memory-mapped"
    with safe_open(files[0], "pt") as f:
        assert torch.equal(table, f.get_tensor("model.embed_tokens.weight"))


def test_loading_never_holds_a_tied_table_twice(tiny_dir):
    """The tied table (64 MiB here) is held before the layers' matrices (72 MiB) are built, so that loading peaks
    near what it keeps. Held last, the table read from the file and its held copy were both in memory on top of
    every built layer: the peak passed the loaded size by the whole table."""
    folder = tiny_dir("llama", vocab_size=32768, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                      tie_word_embeddings=True)
    table_mib = 32768 * 1024 * 2 / 2**20
    # VmHWM, this process's own peak: ru_maxrss would carry over the peak of the pytest process that forked it
    script = ("import re, torch\n"
              "from sparsezip.runtime import load_model\n"
              f"model = load_model({str(folder)!r}, 'cpu', weights='dense')\n"
              "status = open('/proc/self/status').read()\n"
              "kib = {k: int(re.search(k + r':\\s+(\\d+)', status)[1]) for k in ('VmHWM', 'VmRSS')}\n"
              "print((kib['VmHWM'] - kib['VmRSS']) / 1024)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < table_mib / 2


def test_loading_a_model_does_not_import_the_compiler_stack(tiny_dir):
    """torch's compiler stack (dynamo, inductor, triton) costs ~150 MiB resident: a CPU load and a generation must
    not pull it in (a random init of the embedding table on the meta device did). In a fresh process: this one's
    other tests may have imported it."""
    folder = tiny_dir("llama")
    script = ("import sys, torch\n"
              "from sparsezip.runtime import load_model\n"
              f"model = load_model({str(folder)!r}, 'cpu', weights='dense')\n"
              "with torch.inference_mode():\n    model(torch.tensor([[1, 2, 3]]))\n"
              "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'triton') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_hold_copies_a_matrix_into_its_held_dtype():
    from sparsezip.layouts.dense import hold

    weight = torch.randn(64, 32).half()
    held = hold(weight, torch.float32, "cpu")
    assert held.dtype == torch.float16 and torch.equal(held, weight)
    weight.zero_()  # a copy: the source may be a mapped file or a buffer freed after loading
    assert held.abs().sum() > 0
    assert hold(torch.randn(8, 8).bfloat16(), torch.float32, "cpu").dtype == torch.float32  # fp16 cannot hold bf16
    assert hold(torch.randn(5).half(), torch.float32, "cpu").dtype == torch.float32  # vectors take the compute dtype


@pytest.mark.parametrize("kind", ["w16a16s", "w16a16sc"])
def test_loading_reads_each_pruned_linear_only_when_its_layout_is_built(kind, tiny_dir, tmp_path, monkeypatch):
    """Loading holds the built layouts plus one matrix: a 7B W16A16S folder's 15 GB of fp16 matrices are never all
    in memory at once."""
    from sparsezip import runtime
    from sparsezip.checkpoint import TensorReader
    from sparsezip.compress import compress
    from sparsezip.config import SparsifyConfig
    from sparsezip.sparsify import sparsify

    folder = sparsify(tiny_dir("llama"), tmp_path / "s", SparsifyConfig(method="magnitude", sparsity=0.5))
    if kind == "w16a16sc":
        compress(folder, tmp_path / "sc", tp=1)
        folder = tmp_path / "sc"
    events = []
    real_get, real_build = TensorReader.get, runtime.build_layer
    monkeypatch.setattr(TensorReader, "get", lambda self, name: events.append(name) or real_get(self, name))
    monkeypatch.setattr(runtime, "build_layer",
                        lambda source, *rest: events.append(f"build {source.name}") or real_build(source, *rest))
    runtime.load_model(folder, "cpu", weights="sparse")
    builds = [i for i, e in enumerate(events) if e.startswith("build ")]
    assert len(builds) == 2 * 4  # 2 layers x (qkv, o, gate_up, down)
    for previous, at in zip([-1] + builds, builds):
        prefix = events[at].removeprefix("build ")
        read = [e for e in events[previous + 1:at] if "_proj." in e]
        if kind == "w16a16s":  # the fp16 matrices the fused linear is made of, and only those
            assert read and all(name.startswith(prefix.rsplit(".", 1)[0]) for name in read), (prefix, read)
        else:  # its codec stream (the small .info headers are read up front, by the part's own checks)
            assert [e for e in read if not e.endswith(".info")] == [prefix + ".weight", prefix + ".index"], read


@pytest.mark.slow
def test_compress_streams_each_part_to_disk(tmp_path, big_sparsified):
    """compress holds about one tensor at a time, not a rank's whole encoded part (at 7B, one TP-1 part is 4 GB)."""
    folder, model_bytes, _ = big_sparsified
    command = [sys.executable, "-m", "sparsezip", "-q", "compress", "--model_path", str(folder),
               "--save_directory", str(tmp_path / "c")]
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    peak = int(result.stdout.split()[-1]) * 1024
    (part,) = (tmp_path / "c").glob("part*/*.safetensors")
    part_bytes = part.stat().st_size
    assert part_bytes > model_bytes / 3
    # holding a part's encoded tensors costs the part itself on top of python and torch (and save_file copied it)
    assert peak < part_bytes, f"peak RSS {peak / 2**20:.0f} MiB, a part is {part_bytes / 2**20:.0f} MiB"
