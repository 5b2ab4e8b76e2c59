"""Generation: batching with left padding, sampling rules, stop strings, streaming, weight modes, chat."""

from __future__ import annotations

import io
import sys
import math

import pytest
import torch
from transformers import AutoTokenizer

from sparsezip.chat import chat_loop
from sparsezip import layouts
from sparsezip.compress import compress
from sparsezip.config import ModelArgs
from sparsezip.errors import SparsezipError
from sparsezip.formats import FolderKind
from sparsezip.generate import (SamplingParams, Sampler, TextStream, chat_ids, generate_batch, prompt_ids,
                                stop_ids, truncate)
from sparsezip.kernels import cpu
from sparsezip.kernels.cpu import gemv
from sparsezip.layouts.compressed import CompressedLinear
from sparsezip.layouts.dense import DenseLinear
from sparsezip.layouts.sparse import SparseLinear
from sparsezip.runtime import load_model, weight_bytes
from sparsezip.tp import Dist


GREEDY = SamplingParams(max_new_tokens=10)


@pytest.fixture(scope="module")
def llama(tiny_dir):
    folder = tiny_dir("llama")
    return load_model(folder), AutoTokenizer.from_pretrained(folder)


def prompts_of(tokenizer, *texts):
    return [prompt_ids(tokenizer, t, use_chat_template=False) for t in texts]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_left_padded_batch_gives_the_logits_of_each_prompt_alone(tiny_dir, family):
    folder = tiny_dir(family)
    model = load_model(folder)
    short, long = [5, 9, 33], list(range(40, 60))
    tokens = torch.tensor([[0] * (len(long) - len(short)) + short, long])
    pads = torch.tensor([len(long) - len(short), 0])
    width = tokens.shape[1]
    real = torch.arange(width)[None, :] >= pads[:, None]
    with torch.no_grad():
        model.setup_cache(2, width + 1)
        slots = torch.arange(width)
        batched = model(tokens, slots, real, positions=(slots[None] - pads[:, None]).clamp(min=0), last_only=True)
        model.clear_cache()
        alone = [model(torch.tensor([p]))[0, -1] for p in (short, long)]
    assert batched.shape == (2, 1, model.args.vocab_size)
    assert torch.isfinite(batched).all()
    for row, want in enumerate(alone):
        torch.testing.assert_close(batched[row, 0], want, rtol=1e-4, atol=1e-4)


def test_batched_greedy_tokens_equal_one_prompt_at_a_time(llama):
    model, tok = llama
    prompts = prompts_of(tok, "It is a truth", "Emma Woodhouse, handsome, clever and rich, had", "Yes")
    batched = generate_batch(model, tok, prompts, GREEDY, set(), max_batch_size=8)
    chunked = generate_batch(model, tok, prompts, GREEDY, set(), max_batch_size=2)
    alone = [generate_batch(model, tok, [p], GREEDY, set())[0] for p in prompts]
    assert [g.tokens for g in batched] == [g.tokens for g in alone] == [g.tokens for g in chunked]
    assert all(len(g.tokens) == 10 and g.finish_reason == "length" for g in batched)
    assert [g.prompt_tokens for g in batched] == [len(p) for p in prompts]
    assert batched[0].text == tok.decode(batched[0].tokens, skip_special_tokens=True)


def test_eos_ends_one_row_and_not_the_others(llama):
    model, tok = llama
    prompts = prompts_of(tok, "It is a truth", "Emma Woodhouse")
    free = generate_batch(model, tok, prompts, GREEDY, set())
    eos = {free[0].tokens[3]}  # make the 4th token of the first answer an end-of-sequence token
    stopped = generate_batch(model, tok, prompts, GREEDY, eos)
    first = free[0].tokens.index(free[0].tokens[3])
    assert stopped[0].tokens == free[0].tokens[:first] and stopped[0].finish_reason == "stop"
    if not eos & set(free[1].tokens):
        assert stopped[1].tokens == free[1].tokens and stopped[1].finish_reason == "length"


def test_sampling_is_seeded_and_top_k_1_is_greedy(llama):
    model, tok = llama
    prompts = prompts_of(tok, "It is a truth")
    hot = dict(max_new_tokens=12, temperature=1.5)
    a = generate_batch(model, tok, prompts, SamplingParams(**hot, seed=1), set())[0].tokens
    b = generate_batch(model, tok, prompts, SamplingParams(**hot, seed=1), set())[0].tokens
    c = generate_batch(model, tok, prompts, SamplingParams(**hot, seed=2), set())[0].tokens
    assert a == b and a != c
    greedy = generate_batch(model, tok, prompts, SamplingParams(max_new_tokens=12), set())[0].tokens
    for narrow in (dict(top_k=1), dict(top_p=1e-6)):
        got = generate_batch(model, tok, prompts, SamplingParams(**hot, **narrow, seed=3), set())[0].tokens
        assert got == greedy, narrow


def test_truncate_keeps_top_k_and_the_smallest_top_p_set():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    assert torch.isfinite(truncate(logits, 2, 1.0)).tolist() == [[True, False, True, False]]
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the two likeliest tokens make the nucleus
    assert torch.isfinite(truncate(logits, 0, 0.7)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(truncate(logits, 0, 0.85)).tolist() == [[True, False, True, True]]
    assert torch.isfinite(truncate(logits, 0, 1.0)).all()
    # a top_p that float32 holds as 0 still keeps the likeliest token (it had dropped them all: NaN probabilities)
    assert torch.isfinite(truncate(logits, 0, 1e-300)).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("narrow", [dict(temperature=1e-40), dict(temperature=1e-300),
                                    dict(temperature=1.0, top_p=1e-300)])
def test_vanishing_temperature_or_top_p_samples_the_greedy_token(narrow, llama):
    """Logits divided by a temperature of 1e-40 overflowed to inf (NaN probabilities, a crash in multinomial)."""
    model, tok = llama
    prompts = prompts_of(tok, "It is a truth")
    greedy = generate_batch(model, tok, prompts, SamplingParams(max_new_tokens=6), set())[0].tokens
    got = generate_batch(model, tok, prompts, SamplingParams(max_new_tokens=6, seed=4, **narrow), set())[0].tokens
    assert got == greedy


def test_repetition_penalty_shrinks_seen_logits_by_sign():
    # row 0: prompt token 5 (the 0 before it is padding); row 1: prompt token 6
    sampler = Sampler(SamplingParams(repetition_penalty=2.0), 8, torch.tensor([[0, 5], [6, 6]]),
                      torch.tensor([[False, True], [True, True]]), "cpu")
    logits = torch.full((2, 8), -1.0)
    logits[0, 5], logits[0, 0] = 2.0, 1.8  # seen 5: 2.0 / 2 = 1.0 < 1.8 (padding did not mark 0 as seen)
    logits[1, 6], logits[1, 2] = -0.1, -0.15  # seen 6: -0.1 * 2 = -0.2 < -0.15
    assert sampler.pick(logits).tolist() == [0, 2]
    assert sampler.pick(logits).tolist() == [5, 6]  # 0 and 2 are seen now: 1.8 / 2 = 0.9 < 1.0; -0.3 < -0.2


class CharTokenizer:
    """Token i decodes to ALPHABET[i]; ids >= len(ALPHABET) are the bytes of 'é' split in two."""

    ALPHABET = "ab. XYZ"

    def decode(self, ids, skip_special_tokens=True):
        raw = b"".join(self.ALPHABET[i].encode() if i < len(self.ALPHABET) else "é".encode()[i - len(self.ALPHABET):][:1]
                       for i in ids)
        return raw.decode("utf-8", errors="replace")


def stream_all(tokens, stop):
    stream, pieces = TextStream(CharTokenizer(), stop), []
    for t in tokens:
        pieces.append(stream.push(t))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return stream, pieces


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_before_it():
    stream, pieces = stream_all([0, 1, 3, 4, 5, 0, 1], stop=("XYZ",))  # "ab XY" then "ab": XY was no stop
    assert "".join(pieces) == stream.text == "ab XYab" and not stream.stopped
    assert pieces[3] == "" and pieces[4] == ""  # "X", "XY" held back while they could begin "XYZ"
    stream, pieces = stream_all([0, 1, 4, 5, 6, 0], stop=("XYZ", "b."))
    assert stream.stopped and "".join(pieces) == stream.text == "ab"
    assert stream.tokens == [0, 1, 4, 5, 6]  # the token that completed the stop string ends the stream


def test_text_stream_never_emits_half_a_character():
    e1, e2 = len(CharTokenizer.ALPHABET), len(CharTokenizer.ALPHABET) + 1
    stream, pieces = stream_all([0, e1, e2, 1], stop=())
    assert pieces[:3] == ["a", "", "é"] and stream.text == "aéb"


def test_sampling_params_are_checked():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                dict(repetition_penalty=0), dict(stop=("",)), dict(temperature=math.nan), dict(seed=2**63),
                dict(seed=-2**63 - 1)):
        with pytest.raises(SparsezipError):
            SamplingParams(**bad).check()


def test_context_overflow_is_a_clear_error(llama):
    model, tok = llama
    with pytest.raises(SparsezipError, match="context"):
        generate_batch(model, tok, [[1, 2, 3]], SamplingParams(max_new_tokens=10**6), set())


@pytest.fixture(scope="module")
def packed(tiny_dir, tmp_path_factory):
    """A 50%-sparse tiny Qwen2 (q/k/v bias) compressed at TP 1."""
    from sparsezip.config import SparsifyConfig
    from sparsezip.sparsify import sparsify

    root = tmp_path_factory.mktemp("packed")
    sparse = sparsify(tiny_dir("qwen2"), root / "s", SparsifyConfig(method="magnitude", sparsity=0.5))
    compress(sparse, root / "c", tp=1)
    return sparse, root / "c"


def test_compressed_mode_gives_identical_logits_and_holds_less(packed):
    sparse, folder = packed
    dense, lean = load_model(folder), load_model(folder, weights="compressed")
    assert any(isinstance(m, CompressedLinear) for m in lean.modules())
    assert not any(isinstance(m, torch.nn.Linear) and "layers" in name for name, m in lean.named_modules())
    tokens = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(dense(tokens), lean(tokens))
        assert torch.equal(dense(tokens[:1, :1]), lean(tokens[:1, :1]))  # one row: the fused path vs the GEMV
    tok = AutoTokenizer.from_pretrained(folder)
    answers = [generate_batch(m, tok, [tokens[0, :9].tolist()], GREEDY, set())[0].tokens for m in (dense, lean)]
    assert answers[0] == answers[1]
    compressed = [m for m in lean.modules() if isinstance(m, CompressedLinear)]
    fp16_bytes = 2 * sum(m.in_features * m.out_features for m in compressed)
    assert sum(m.resident_bytes() for m in compressed) < 0.6 * fp16_bytes
    scratch = compressed[0].scratch
    assert all(m.scratch is scratch for m in compressed)  # one buffer shared by every linear
    assert scratch.nbytes == 4 * max(m.in_features * m.out_features for m in compressed)  # fp32 for many rows
    assert weight_bytes(lean) < weight_bytes(dense)


@pytest.mark.skipif(not cpu.available(), reason="no C extension")
def test_compressed_layout_multiplies_a_prompt_from_its_decoded_matrix_with_the_dense_floats(monkeypatch):
    """Up to TILE_PRODUCT_MAX_ROWS rows multiply straight from the tiles; a longer prompt, up to the native kernel's
    row limit for a large matrix, decodes the matrix once as fp16 into the scratch buffer for the dense kernel. Both
    give the dense layout's floats; 2048 x 2048 is a large matrix (128 rows)."""
    from sparsezip import codec
    from sparsezip.layouts import compressed
    from sparsezip.layouts.base import Scratch

    n = k = 2048
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(n, k, generator=gen).half()
    w[torch.rand(n, k, generator=gen) < 0.5] = 0
    bias = torch.randn(n, generator=gen)
    scratch = Scratch("cpu")
    scratch.reserve(n * k, torch.float32)
    lean = CompressedLinear(codec.encode(w, "nibble-v3"), bias, scratch)
    dense = DenseLinear(k, n)
    dense.weight, dense.bias = torch.nn.Parameter(w, requires_grad=False), torch.nn.Parameter(bias, requires_grad=False)
    from_tiles, tile_product = [], codec.linear
    monkeypatch.setattr(compressed.codec, "linear", lambda *a: from_tiles.append(a) or tile_product(*a))
    for rows in (compressed.TILE_PRODUCT_MAX_ROWS, compressed.TILE_PRODUCT_MAX_ROWS + 1, 40, 128):
        x = torch.randn(rows, k, generator=gen)
        assert torch.equal(lean(x), dense(x)), rows
    assert len(from_tiles) == 1  # only the first size


def test_compressed_mode_refuses_uncompressed_folders(packed):
    sparse, _ = packed
    with pytest.raises(SparsezipError, match="W16A16SC"):
        load_model(sparse, weights="compressed")


@pytest.mark.parametrize("which", ["W16A16S", "W16A16SC"])
def test_sparse_mode_gives_identical_logits_and_tokens(packed, which):
    folder = packed[0] if which == "W16A16S" else packed[1]
    dense, lean = load_model(folder), load_model(folder, weights="sparse")
    sparse = [m for m in lean.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 4 * lean.args.num_layers
    assert not any(isinstance(m, torch.nn.Linear) and "layers" in name for name, m in lean.named_modules())
    tokens = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(dense(tokens), lean(tokens))  # 60 rows: unpacked into the scratch buffer
        assert torch.equal(dense(tokens[:1, :1]), lean(tokens[:1, :1]))  # one row: the sparse kernel
        assert torch.equal(dense(tokens[:, :3]), lean(tokens[:, :3]))  # six rows
    tok = AutoTokenizer.from_pretrained(folder)
    answers = [generate_batch(m, tok, [tokens[0, :9].tolist()], GREEDY, set())[0].tokens for m in (dense, lean)]
    assert answers[0] == answers[1]
    # 50% magnitude without L2 rounding: two value bytes per kept weight and a 2-byte code per 8 weights, 10/16 of
    # fp16, plus 12 bytes of row and tile offsets per row (1.5 bits per weight in these 64-column rows) and biases
    fp16_bytes = 2 * sum(m.in_features * m.out_features for m in sparse)
    assert sum(m.resident_bytes() for m in sparse) < 0.75 * fp16_bytes
    pruned_dense = sum(m.resident_bytes() for name, m in dense.named_modules() if "layers" in name and
                       isinstance(m, torch.nn.Linear))
    assert weight_bytes(lean) == weight_bytes(dense) - pruned_dense + sum(m.resident_bytes() for m in sparse) + \
        sparse[0].scratch.nbytes  # the scratch buffer is counted once


@pytest.mark.skipif(not cpu.available(), reason="native extension not built")
def test_wide_linears_held_in_column_blocks_give_the_same_logits_and_tokens(tiny_dir, monkeypatch):
    """An MLP wider than gemv.WIDE_COLS: its down projection is held in column blocks and must give the floats of
    the row-major matrix on every path (many rows unblocked for torch, one row through the one-call decode step,
    a few rows through the GEMV)."""
    folder = tiny_dir("llama", intermediate_size=gemv.WIDE_COLS + 64, num_hidden_layers=1)
    blocked = load_model(folder)
    monkeypatch.setattr(gemv, "WIDE_COLS", 2**30)
    plain = load_model(folder)
    assert blocked.model.layers[0].mlp.down_proj.column_blocked
    assert not any(getattr(m, "column_blocked", False) for m in plain.modules())
    tokens = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for rows in (tokens, tokens[:1, :1], tokens[:, :3]):
            assert torch.equal(blocked(rows), plain(rows))
    tok = AutoTokenizer.from_pretrained(folder)
    answers = [generate_batch(m, tok, [tokens[0, :9].tolist()], GREEDY, set())[0].tokens for m in (blocked, plain)]
    assert answers[0] == answers[1]
    assert weight_bytes(blocked) == weight_bytes(plain)


def test_sparse_mode_refuses_dense_folders(tiny_dir):
    with pytest.raises(SparsezipError, match="W16A16S or W16A16SC folder, but this is a dense folder; sparsify it "
                                             "first"):
        load_model(tiny_dir("llama"), weights="sparse")


def test_chat_keeps_history_resets_and_exits(tiny_dir):
    folder = tiny_dir("qwen3")
    model, tok = load_model(folder), AutoTokenizer.from_pretrained(folder)
    lines = iter(["Hello there", "", "And then?", "/reset", "Once more", "/exit", "never read"])
    out = io.StringIO()
    params = SamplingParams(max_new_tokens=6)
    history = chat_loop(model, tok, params, Dist(), folder, read_line=lambda _: next(lines), out=out)
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "Once more"
    want = generate_batch(model, tok, [chat_ids(tok, [{"role": "user", "content": "Once more"}])], params,
                          stop_ids(tok, folder))
    assert history[1]["content"] == want[0].text
    assert "(new conversation)" in out.getvalue() and next(lines) == "never read"


def test_chat_survives_a_line_that_is_not_utf8(tiny_dir, monkeypatch):
    """The terminal's bytes are read with surrogateescape; the line is refused in the session, which goes on."""
    from sparsezip.chat import read_stdin_line

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi \xff there\nHello\n"), encoding="utf-8"))
    folder = tiny_dir("qwen3")
    model, tok = load_model(folder), AutoTokenizer.from_pretrained(folder)
    out = io.StringIO()
    history = chat_loop(model, tok, SamplingParams(max_new_tokens=3), Dist(), folder, read_line=read_stdin_line,
                        out=out)
    assert "error: the text is not valid UTF-8" in out.getvalue()
    assert [m["content"] for m in history if m["role"] == "user"] == ["Hello"]


@pytest.mark.slow
def test_run_cli_batches_streams_and_refuses_bad_flags(tiny_dir, sparsezip_cli, sparsezip_ok):
    folder = str(tiny_dir("llama"))
    result = sparsezip_ok(sparsezip_cli("run", "--model_path", folder, "--input_texts", "It is", "Emma was", "Yes",
                                        "--max_output_length", "6", "--max_batch_size", "2", "--no_chat_template"))
    assert [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("Answer[")] == [
        "Answer[0]", "Answer[1]", "Answer[2]"]
    streamed = sparsezip_ok(sparsezip_cli("run", "--model_path", folder, "--input_texts", "Emma was", "--stream",
                                          "--max_output_length", "6", "--no_chat_template"))
    answer = [line for line in result.stdout.splitlines() if line.startswith("Answer[1]")][0]
    assert "Answer[0]" + answer.removeprefix("Answer[1]") in streamed.stdout
    for bad in (["--top_p", "0"], ["--max_batch_size", "0"], ["--weights", "compressed"], ["--weights", "sparse"],
                ["--temperature", "-2"], ["--seed", str(2**70)], ["--input_texts", "hi \udcff"]):
        failed = sparsezip_cli("run", "--model_path", folder, *bad)
        assert failed.returncode != 0 and failed.stderr.startswith("sparsezip: error:"), bad
        assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1, failed.stderr


def test_fused_triton_linear_computes_the_decoded_linear(packed, interpreted_triton):
    """The CUDA path of --weights compressed, run under the Triton interpreter on CPU at tiny shapes."""
    from sparsezip import codec
    from sparsezip.formats import PartReader
    from sparsezip.layouts.triton_fused import FusedCompressedLinear

    _, folder = packed
    part = PartReader(folder / "part0-of-1")
    name = "model.layers.0.self_attn.qkv_proj"
    packed_qkv = part.read_linear(name)
    weight = codec.decode(packed_qkv.weight, packed_qkv.index, packed_qkv.info)
    bias = part.read_float(name + ".bias")
    stored = codec.encode(weight, "huff-v2")  # a codec with a Triton kernel
    fused = FusedCompressedLinear(interpreted_triton, interpreted_triton.prepare(stored, "cpu"), bias.half())
    x = torch.randn(3, fused.in_features, generator=torch.Generator().manual_seed(6)).half()
    want = x.double() @ weight.double().T + bias.double()
    torch.testing.assert_close(fused(x).double(), want, rtol=2e-3, atol=2e-3)
    assert fused.resident_bytes() < 2 * weight.numel()


@pytest.mark.parametrize("fastest", ["dense", "sparse", "compressed"])
@pytest.mark.parametrize("which", ["W16A16S", "W16A16SC"])
def test_auto_layout_takes_the_layout_measured_fastest(packed, which, fastest, fake_layout_timings, caplog):
    """Which layout decodes fastest depends on the machine (memory bandwidth against the core's speed at expanding
    sparse groups): auto times the layouts that serve the folder and takes the fastest that fits."""
    seconds = {"dense": 0.3, "sparse": 0.4, "compressed": 0.5, fastest: 0.1}
    asked = fake_layout_timings(seconds)
    folder = {"W16A16S": packed[0], "W16A16SC": packed[1]}[which]
    with caplog.at_level("INFO", logger="sparsezip"):
        model = load_model(folder, weights="auto")
    serving = {"dense", "sparse"} | ({"compressed"} if which == "W16A16SC" else set())
    assert asked == [serving]
    chosen = fastest if fastest in serving else "dense"
    classes = {type(m).__name__ for name, m in model.named_modules() if name.endswith(("qkv_proj", "down_proj"))}
    assert classes == {f"{chosen.capitalize()}Linear"}
    line = next(r.message for r in caplog.records if r.message.startswith("weights: "))
    assert line.startswith(f"weights: {chosen} (the fastest that fits") and "measured on this machine" in line


def test_auto_layout_of_a_dense_folder_measures_nothing(tiny_dir, fake_layout_timings):
    asked = fake_layout_timings({})
    model = load_model(tiny_dir("qwen2"), weights="auto")
    assert asked == [] and {type(m) for n, m in model.named_modules() if n.endswith("down_proj")} == {DenseLinear}


def test_time_layouts_times_each_layout_on_real_weights(packed):
    """The real measurement: a positive time per layout, from the folder's own linears."""
    import sparsezip.runtime as runtime
    from sparsezip.layouts.base import LayoutContext

    args = ModelArgs.from_dir(packed[1])
    weights = runtime.rank_weights_from_part(packed[1], Dist())
    runtime.separate_linears(weights, args, packed[1])
    before = set(weights.linears)
    sources = runtime.probe_sources(weights)
    assert set(weights.linears) == before  # read again, not taken
    assert [s.name for s in sources] == list(weights.linears)[:len(sources)]
    classes = {name: runtime.serving_class(name, FolderKind.W16A16SC, "cpu", torch.float32)
               for name in ("dense", "sparse", "compressed")}
    seconds = runtime.time_layouts(classes, sources, LayoutContext("cpu", torch.float32), Dist())
    assert set(seconds) == set(classes) and all(0 < t < 10 for t in seconds.values())


def test_auto_layout_on_cuda_takes_dense_when_it_fits_else_compressed(packed, monkeypatch, caplog):
    """On CUDA nothing is timed: dense (cuBLAS) decoded faster than the fused compressed kernels on the GPU we
    measured, so it wins whenever it fits, and the compressed layout serves a model that only fits compressed."""
    import sparsezip.runtime as runtime

    args, kind = ModelArgs.from_dir(packed[1]), FolderKind.W16A16SC
    pruned, other = runtime.weight_counts(args, 1)
    fp16_bytes = 2 * (pruned + other)
    monkeypatch.setattr(runtime, "serving_class", lambda name, *rest: layouts.classes(name)[-1]
                        if kind in layouts.classes(name)[0].folder_kinds else None)  # the GPU's classes, on the CPU
    for free, chosen in ((10 * fp16_bytes, "dense"), (fp16_bytes, "compressed")):
        monkeypatch.setattr(runtime, "free_memory", lambda device, free=free: free)
        with caplog.at_level("INFO", logger="sparsezip"):
            name = runtime.auto_layout(packed[1], kind, args, "cuda", torch.float16, Dist(), None)
        assert name == chosen
        assert f"weights: {chosen} (the first that fits in the registry's order" in caplog.records[-1].message


def test_auto_layout_takes_the_smallest_when_memory_is_short(packed, monkeypatch, fake_layout_timings):
    import sparsezip.runtime as runtime

    monkeypatch.setattr(runtime, "free_memory", lambda device: 1)  # nothing fits: the fewest bytes win
    fake_layout_timings({"dense": 0.1, "sparse": 0.2, "compressed": 0.3})  # whatever the speeds
    model = load_model(packed[1], weights="auto")
    assert any(isinstance(m, CompressedLinear) for m in model.modules())
    model = load_model(packed[0], weights="auto")  # W16A16S: the sparse layout is its smallest
    assert any(isinstance(m, SparseLinear) for m in model.modules())


def test_text_that_is_not_utf8_is_one_clear_error(llama):
    """Undecodable bytes reach Python as lone surrogates (command line, terminal, JSON's \\ud800)."""
    _, tok = llama
    for text in ("hi \udcff there", "\ud800"):
        with pytest.raises(SparsezipError, match="not valid UTF-8: an undecodable byte or lone surrogate at character"):
            prompt_ids(tok, text, use_chat_template=False)
