"""The sparsify driver: stage-by-stage layer pass, methods end to end, rounding, OWL, jsonl, sharding."""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from sparsezip.calibrate import SAMPLES_PER_BATCH, Activations, LayerPass, Spill, embed_samples, load_layer, owl_allocation, read_layer
from sparsezip.checkpoint import TensorReader
from sparsezip import pruners
from sparsezip.cli import main
from sparsezip.config import ModelArgs, OwlConfig, SparsifyConfig, read_json
from sparsezip.formats import weight_files as safetensors_files
from sparsezip.data import calibration_samples
from sparsezip.model import attention_mask, causal_attention_in_chunks, rope_cos_sin
from sparsezip.runtime import load_model
from sparsezip.sparsify import sparsify

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linears(folder):
    reader = TensorReader(safetensors_files(folder))
    return {n: reader.get(n) for n in reader.names() if n.endswith(".weight") and n.split(".")[-2] in LINEARS}


def test_stage_by_stage_pass_equals_the_layer_forward(tiny_dir):
    folder = tiny_dir("qwen3")
    args = ModelArgs.from_dir(folder)
    layer = load_layer(args, read_layer(args, TensorReader(safetensors_files(folder)), 0), 0, "cpu")
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(3, 12, args.hidden_size, generator=g), torch.randn(1, 7, args.hidden_size, generator=g)]
    seen = []
    given = list(hidden)
    out = LayerPass(args, "cpu", needs_hessian=False)(layer, Activations(given), lambda name, *_: seen.append(name))
    assert given == []  # the pass empties its input list: nothing holds the batches to the end of the layer
    assert out.dense is None
    out = out.pruned
    stages = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    assert seen == stages
    for x, y in zip(hidden, out):
        pos = torch.arange(x.shape[1])
        with torch.no_grad():
            want = layer(x, *rope_cos_sin(args, pos, x.dtype), attention_mask(args, pos, x.shape[1]))
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    seen.clear()
    assert LayerPass(args, "cpu", needs_hessian=False)(layer, Activations(list(hidden)),
                                                       lambda name, *_: seen.append(name), last=True).pruned == []
    assert seen == stages  # the final layer's linears are all still calibrated


def test_calibration_layer_holds_fp16_matrices_and_computes_the_fp32_layers_floats(tiny_dir):
    """Half an fp32 layer's memory, and the same floats for every batch size: few rows included, where an fp16
    DenseLinear would take the native GEMV (another summation order)."""
    from sparsezip.model import DecoderLayer
    from sparsezip.tp import Dist

    folder = tiny_dir("qwen2")
    args = ModelArgs.from_dir(folder)
    state = read_layer(args, TensorReader(safetensors_files(folder)), 0)
    held = load_layer(args, state, 0, "cpu")
    with torch.device("meta"):
        fp32 = DecoderLayer(args, Dist())
    fp32.load_state_dict({k[len("model.layers.0."):]: v.float() for k, v in state.items()}, strict=True, assign=True)
    matrices = [p for p in held.parameters() if p.dim() == 2]
    assert len(matrices) == 4 and all(p.dtype == torch.float16 for p in matrices)
    assert all(p.dtype == torch.float32 for p in held.parameters() if p.dim() == 1)
    g = torch.Generator().manual_seed(3)
    hidden = [torch.randn(1, 3, args.hidden_size, generator=g), torch.randn(2, 12, args.hidden_size, generator=g)]
    got = LayerPass(args, "cpu", needs_hessian=False)(held, Activations(list(hidden)), lambda *_: None).pruned
    want = LayerPass(args, "cpu", needs_hessian=False)(fp32, Activations(list(hidden)), lambda *_: None).pruned
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_spill_gives_back_every_tensor_exactly_and_leaves_no_file():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, 5, 7, generator=g), torch.tensor([float("nan"), -0.0, float("inf")]), torch.randn(3, 1)]
    with Spill() as spill:
        for t in tensors:
            spill.put(t)
        assert os.fstat(spill.file.fileno()).st_nlink == 0  # unlinked from the start: nothing left after a crash
        back = list(spill.read_back())
    assert spill.file.closed
    assert [b.shape for b in back] == [t.shape for t in tensors]
    for b, t in zip(back, tensors):
        assert torch.equal(b.view(torch.int32), t.view(torch.int32))


def live_activation_batches(width: int) -> int:
    """3-D tensors [B, L, width] alive now (the layer pass's batches)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and o.dim() == 3 and o.shape[-1] == width)


def layer_forward(args, layer, x):
    pos = torch.arange(x.shape[1])
    with torch.no_grad():
        return layer(x, *rope_cos_sin(args, pos, x.dtype), attention_mask(args, pos, x.shape[1]))


def test_dense_stream_gives_each_linear_the_dense_models_outputs_as_target(tiny_dir):
    folder = tiny_dir("qwen2")  # q/k/v biases: the target must leave them out
    args = ModelArgs.from_dir(folder)
    layer = load_layer(args, read_layer(args, TensorReader(safetensors_files(folder)), 0), 0, "cpu")
    dense_layer = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(2)
    pruned_in = [torch.randn(2, 9, args.hidden_size, generator=g) for _ in range(2)]
    dense_in = [x + 0.1 * torch.randn(x.shape, generator=g) for x in pruned_in]
    # the dense inputs of the first linear, and what its dense weights make of them
    x_p = torch.cat([layer.input_layernorm(x).flatten(0, 1) for x in pruned_in]).detach()
    x_d = torch.cat([layer.input_layernorm(x).flatten(0, 1) for x in dense_in]).detach()
    want_qkv = x_p.T @ (x_d @ layer.self_attn.qkv_proj.weight.detach().float().T)
    targets = {}

    def prune_half(name, linear, stats):
        targets[name] = stats.dense_target
        linear.weight.data[:, ::2] = 0

    out = LayerPass(args, "cpu", needs_hessian=True)(layer, Activations(list(pruned_in), list(dense_in)), prune_half)
    assert list(targets) == ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    assert [tuple(t.shape) for t in targets.values()] == [
        (lin.in_features, lin.out_features) for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                        layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    torch.testing.assert_close(targets["self_attn.qkv_proj"], want_qkv, rtol=1e-4, atol=1e-3)
    for x_dense, y_dense, x, y in zip(dense_in, out.dense, pruned_in, out.pruned, strict=True):
        torch.testing.assert_close(y_dense, layer_forward(args, dense_layer, x_dense), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, layer_forward(args, layer, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.dense[0], layer_forward(args, layer, dense_in[0]))  # the pruning mattered


def test_dense_stream_gives_targets_only_to_the_stages_asked_for(tiny_dir):
    folder = tiny_dir("llama")
    args = ModelArgs.from_dir(folder)
    layer = load_layer(args, read_layer(args, TensorReader(safetensors_files(folder)), 0), 0, "cpu")
    dense_layer = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(3)
    dense_in = [torch.randn(2, 9, args.hidden_size, generator=g) for _ in range(2)]
    targets = {}

    def prune_half(name, linear, stats):
        targets[name] = stats.dense_target
        linear.weight.data[:, ::2] = 0

    run = LayerPass(args, "cpu", needs_hessian=True, dense_stages=("self_attn.o_proj",))
    out = run(layer, Activations([x.clone() for x in dense_in], list(dense_in)), prune_half)
    assert [name for name, t in targets.items() if t is not None] == ["self_attn.o_proj"]
    assert len(targets) == 4
    # the dense stream still went through the whole dense layer, its MLP included
    for x_dense, y_dense in zip(dense_in, out.dense, strict=True):
        torch.testing.assert_close(y_dense, layer_forward(args, dense_layer, x_dense), rtol=1e-5, atol=1e-5)


def test_mlp_activations_are_not_held_while_the_down_projection_is_pruned(tiny_dir):
    folder = tiny_dir("qwen3")
    args = ModelArgs.from_dir(folder)
    layer = load_layer(args, read_layer(args, TensorReader(safetensors_files(folder)), 0), 0, "cpu")
    hidden = [torch.randn(2, 9, args.hidden_size) for _ in range(3)]
    held = {}

    inputs = {}

    def on_linear(name, *_):
        held[name] = live_activation_batches(args.intermediate_size)
        inputs[name] = live_activation_batches(args.hidden_size)

    given = [x.clone() for x in hidden]  # held by the pass alone, as sparsify hands them over
    out = LayerPass(args, "cpu", needs_hessian=True)(layer, Activations(given), on_linear).pruned
    assert held["mlp.down_proj"] == 0, "the MLP activations stay in memory during the down projection's pruning"
    # `hidden` here (3 batches) and the residual stream (3): the layer's own input batches are gone
    assert inputs["mlp.down_proj"] == 2 * len(hidden), inputs
    assert len(out) == len(hidden)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_in_query_chunks_equals_one_masked_call(window):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 6, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 40, 16)
    pos = torch.arange(40)
    mask = pos[None, :] <= pos[:, None]
    if window:
        mask &= pos[None, :] > pos[:, None] - window
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], enable_gqa=True)
    for chunk in (7, 16, 64):
        torch.testing.assert_close(causal_attention_in_chunks(q, k, v, mask[None, None], chunk), want)


def test_samples_are_embedded_in_batches_of_equal_length(tiny_dir):
    reader = TensorReader(safetensors_files(tiny_dir("llama")))
    samples = [torch.arange(i, i + 5) for i in range(SAMPLES_PER_BATCH + 2)] + [torch.arange(3), torch.arange(4, 7)]
    got = embed_samples(reader, samples)
    assert [tuple(b.shape[:2]) for b in got] == [(SAMPLES_PER_BATCH, 5), (2, 5), (2, 3)]
    table = reader.get("model.embed_tokens.weight").float()
    assert torch.equal(torch.cat([b.flatten(0, 1) for b in got]), table[torch.cat(samples)])


def test_owl_allocation_keeps_the_mean_and_gives_outlier_layers_less_sparsity():
    ratios = owl_allocation([0.01, 0.05, 0.02, 0.09], sparsity=0.5, lam=0.08)
    assert sum(ratios) / 4 == pytest.approx(0.5)
    assert max(ratios) - min(ratios) == pytest.approx(0.16)
    assert ratios[3] == min(ratios) and ratios[0] == max(ratios)
    assert owl_allocation([0.02, 0.02], 0.4, 0.08) == pytest.approx([0.4, 0.4])


@pytest.mark.parametrize("rounding", ["none", "l2"])
def test_float_sparse_zeroes_exactly_the_ratio_over_each_matrix(tiny_dir, text_file, tmp_path, rounding):
    out = sparsify(tiny_dir("llama"), tmp_path / "s", SparsifyConfig(
        method="float_sparse", sparsity=0.4, calib=[text_file], calib_samples=8, calib_seqlen=64, rounding=rounding))
    assert read_json(out / "quant_model_description.json")["metadata"]["rounding"] == rounding
    for name, w in linears(out).items():
        bits = w.view(torch.int16)
        zeros = int((bits == 0).sum())
        if rounding == "none":
            assert zeros == int(w.numel() * 0.4), name
            continue
        assert zeros >= int(w.numel() * 0.4), name  # rounding may send tiny kept values to 0 as well
        nonzero = bits != 0
        low_byte_zero = ((bits & 0xFF) == 0) & nonzero
        assert low_byte_zero.sum() >= nonzero.sum() - int(w.numel() * 0.02), name  # at most 2% kept exact


def test_dense_targets_bring_the_pruned_model_closer_to_the_dense_one(tiny_dir, text_file, tmp_path):
    folder = tiny_dir("llama")
    config = SparsifyConfig(method="float_sparse", sparsity=0.5, calib=[text_file], calib_samples=16,
                            calib_seqlen=64, rounding="none")  # 8 tokens per input of the widest linear
    fitted = {targets: sparsify(folder, tmp_path / targets, replace(config, targets=targets))
              for targets in ("dense", "local")}
    assert read_json(fitted["dense"] / "quant_model_description.json")["metadata"]["targets"] == "dense"
    assert read_json(fitted["local"] / "quant_model_description.json")["metadata"]["targets"] == "local"
    assert config.targets == "local"  # the original's fit stays the default
    assert "target_blend" not in read_json(fitted["local"] / "quant_model_description.json")["metadata"]
    assert read_json(fitted["dense"] / "quant_model_description.json")["metadata"]["target_blend"] == 1.0
    tokens = torch.randint(0, 320, (4, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = load_model(folder)(tokens)
        miss = {t: float((load_model(f)(tokens) - want).norm()) for t, f in fitted.items()}
    assert miss["dense"] < 0.99 * miss["local"], miss


def spy_on_float_sparse(monkeypatch, keyword: str) -> list:
    """The values of one keyword argument in every float_sparse call, in order, while the pruner still runs."""
    seen = []
    real = pruners.METHODS["float_sparse"].prune

    def spy(w, stats, ratio, pattern, **kwargs):
        seen.append(kwargs[keyword])
        return real(w, stats, ratio, pattern, **kwargs)

    monkeypatch.setitem(pruners.METHODS, "float_sparse", replace(pruners.METHODS["float_sparse"], prune=spy))
    return seen


def float_sparse_config(text_file) -> SparsifyConfig:
    return SparsifyConfig(method="float_sparse", sparsity=0.5, calib=[text_file], calib_samples=4, calib_seqlen=32,
                          rounding="none")


def test_admm_rho_reaches_the_pruner_and_the_description(tiny_dir, text_file, tmp_path, monkeypatch):
    folder, config = tiny_dir("llama"), float_sparse_config(text_file)
    seen = spy_on_float_sparse(monkeypatch, "rho")
    out = {rho: sparsify(folder, tmp_path / str(rho), replace(config, admm_rho=rho)) for rho in (1.0, 0.6)}
    assert config.admm_rho == 1.0  # the original's penalty stays the default
    assert seen and set(seen) == {1.0, 0.6} and seen.count(0.6) == len(seen) // 2
    assert read_json(out[0.6] / "quant_model_description.json")["metadata"]["admm_rho"] == 0.6
    assert read_json(out[1.0] / "quant_model_description.json")["metadata"]["admm_rho"] == 1.0
    differ = [name for name, w in linears(out[0.6]).items() if not torch.equal(w, linears(out[1.0])[name])]
    assert differ  # another penalty, other weights


def test_mask_scope_reaches_the_pruner_and_the_description(tiny_dir, text_file, tmp_path, monkeypatch):
    folder, config = tiny_dir("llama"), float_sparse_config(text_file)
    seen = spy_on_float_sparse(monkeypatch, "row_masks")
    out = {scope: sparsify(folder, tmp_path / scope, replace(config, mask_scope=scope)) for scope in ("matrix", "row")}
    assert config.mask_scope == "matrix"  # the original's whole-matrix ranking stays the default
    assert seen and seen.count(True) == seen.count(False) == len(seen) // 2
    for scope, path in out.items():
        assert read_json(path / "quant_model_description.json")["metadata"]["mask_scope"] == scope
    rows = linears(out["row"])
    assert all(int((w == 0).sum(1).min()) == int((w == 0).sum(1).max()) for w in rows.values())  # equal per row
    assert any(int((w == 0).sum(1).min()) != int((w == 0).sum(1).max()) for w in linears(out["matrix"]).values())


def test_mask_score_reaches_the_pruner_and_the_description(tiny_dir, text_file, tmp_path, monkeypatch):
    folder, config = tiny_dir("llama"), float_sparse_config(text_file)
    seen = spy_on_float_sparse(monkeypatch, "mask_score")
    out = {score: sparsify(folder, tmp_path / score, replace(config, mask_score=score))
           for score in ("magnitude", "obs")}
    assert config.mask_score == "magnitude"  # the original's score stays the default
    assert seen and seen.count("obs") == seen.count("magnitude") == len(seen) // 2
    for score, path in out.items():
        assert read_json(path / "quant_model_description.json")["metadata"]["mask_score"] == score
    assert linears(out["obs"]).keys() == linears(out["magnitude"]).keys()
    assert any(not torch.equal(w, linears(out["magnitude"])[name]) for name, w in linears(out["obs"]).items())


def test_auto_damping_changes_only_the_linears_with_fewer_tokens_than_inputs(tiny_dir, text_file, tmp_path,
                                                                             monkeypatch):
    # 4 x 16 calibration tokens: as many as the 64-wide linears' inputs, fewer than down_proj's 128
    folder = tiny_dir("llama")
    config = replace(float_sparse_config(text_file), calib_seqlen=16)
    seen = spy_on_float_sparse(monkeypatch, "damp")
    out = {str(d): sparsify(folder, tmp_path / str(d), replace(config, admm_damp=d)) for d in (0.1, "auto")}
    assert config.admm_damp == 0.1  # the original's damping stays the default
    assert set(seen) == {0.1, "auto"}
    assert read_json(out["auto"] / "quant_model_description.json")["metadata"]["admm_damp"] == "auto"
    auto, fixed = linears(out["auto"]), linears(out["0.1"])
    # layer 0's inputs are the same in both runs; later layers see the changed down projections' outputs
    differ = {name.split(".")[-2] for name in auto if ".layers.0." in name and not torch.equal(auto[name], fixed[name])}
    assert differ == {"down_proj"}


def test_dense_targets_only_where_the_calibration_has_8_tokens_per_input(tiny_dir, text_file, tmp_path, monkeypatch,
                                                                         caplog):
    # 8 x 64 calibration tokens: 8 per input of the 64-wide linears, 4 per input of down_proj (128 wide)
    seen = []
    original = pruners.METHODS["float_sparse"]

    def spy(w, stats, ratio, pattern, dense_target=None, **kwargs):
        assert (stats.dense_target is None) == (dense_target is None)  # no unused target was accumulated
        seen.append((stats.tokens, w.shape[1], dense_target is not None))
        assert kwargs.get("target_blend") == (0.5 if dense_target is not None else None)
        return original.prune(w, stats, ratio, pattern, dense_target=dense_target, **kwargs)

    monkeypatch.setitem(pruners.METHODS, "float_sparse", replace(original, prune=spy))
    with caplog.at_level(logging.WARNING, logger="sparsezip"):
        out = sparsify(tiny_dir("llama"), tmp_path / "s", SparsifyConfig(
            method="float_sparse", sparsity=0.5, calib=[text_file], calib_samples=8, calib_seqlen=64,
            rounding="none", targets="dense", target_blend=0.5))
    assert {(tokens, width) for tokens, width, _ in seen} == {(512, 64), (512, 128)}
    assert all(fitted_dense == (width == 64) for _, width, fitted_dense in seen), seen
    assert "mlp.down_proj keeps the original fit" in caplog.text
    assert read_json(out / "quant_model_description.json")["metadata"]["local_fit"] == ["mlp.down_proj"]


def test_dense_targets_with_too_few_tokens_everywhere_are_the_original_fit(tiny_dir, text_file, tmp_path):
    folder = tiny_dir("llama")
    config = SparsifyConfig(method="float_sparse", sparsity=0.5, calib=[text_file], calib_samples=4, calib_seqlen=64,
                            rounding="none")
    fitted = {targets: linears(sparsify(folder, tmp_path / targets, replace(config, targets=targets)))
              for targets in ("dense", "local")}
    for name, w in fitted["local"].items():
        assert torch.equal(fitted["dense"][name], w), name


def test_sparsegpt_with_qkv_bias_prunes_every_row_exactly(tiny_dir, text_file, tmp_path):
    out = sparsify(tiny_dir("qwen2"), tmp_path / "s", SparsifyConfig(
        method="sparsegpt", sparsity=0.5, calib=[text_file], calib_samples=8, calib_seqlen=64))
    for name, w in linears(out).items():
        assert ((w.view(torch.int16) == 0).sum(1) == w.shape[1] // 2).all(), name
    model = load_model(out)
    tokens = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model(tokens)).all()


def test_owl_records_layer_ratios_that_the_weights_follow(tiny_dir, text_file, tmp_path):
    folder = tiny_dir("llama")
    out = sparsify(folder, tmp_path / "s", SparsifyConfig(method="wanda", sparsity=0.5, calib=[text_file],
                                                          calib_samples=8, calib_seqlen=64, owl=OwlConfig(lam=0.1)))
    owl = read_json(out / "quant_model_description.json")["metadata"]["owl"]
    layer_ratio = owl["layer_sparsity"]
    assert len(layer_ratio) == ModelArgs.from_dir(folder).num_layers
    assert sum(layer_ratio) / len(layer_ratio) == pytest.approx(0.5)
    assert max(layer_ratio) - min(layer_ratio) == pytest.approx(0.2, abs=1e-6)
    for name, w in linears(out).items():
        ratio = layer_ratio[int(name.split(".")[2])]
        assert ((w == 0).sum(1) == int(w.shape[1] * ratio)).all(), name


def test_jsonl_calibration_gives_one_sample_per_record(tiny_dir, tmp_path, caplog):
    records = [{"text": "It is a truth universally acknowledged. " * 20}, {"text": "Short one here."},
               {"inputs_pretokenized": "A single man in possession of a good fortune. " * 5}]
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    from transformers import AutoTokenizer

    samples = calibration_samples(AutoTokenizer.from_pretrained(tiny_dir("llama")), [path], seqlen=48)
    assert len(samples) == 3 and len(samples[0]) == 48 and len(samples[1]) < 48
    with caplog.at_level(logging.WARNING, logger="sparsezip"):
        out = sparsify(tiny_dir("llama"), tmp_path / "s", SparsifyConfig(method="wanda", calib=[path], calib_seqlen=48))
    meta = read_json(out / "quant_model_description.json")["metadata"]
    assert meta["calibration_samples"] == 3 and meta["calibration_tokens"] == sum(len(s) for s in samples)
    assert "at least 2048" in caplog.text


def test_sharded_output_loads_like_a_single_file(tiny_dir, text_file, tmp_path):
    folder = tiny_dir("llama")
    one = sparsify(folder, tmp_path / "one", SparsifyConfig(method="magnitude"))
    many = sparsify(folder, tmp_path / "many", SparsifyConfig(method="magnitude", part_file_size=40e3 / 2**30))
    index = read_json(many / "quant_model_weights.safetensors.index.json")
    assert len(set(index["weight_map"].values())) > 2 and len(safetensors_files(many)) > 2
    tokens = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        assert torch.equal(load_model(one)(tokens), load_model(many)(tokens))


def test_quant_w16a16s_runs_float_sparse_at_ratio_0_4(tiny_dir, text_file, tmp_path):
    out = tmp_path / "q"
    assert main(["-q", "quant", "--model_path", str(tiny_dir("llama")), "--save_path", str(out),
                 "--quant_type", "w16a16s", "--calib", str(text_file)]) == 0
    meta = read_json(out / "quant_model_description.json")["metadata"]
    assert (meta["method"], meta["sparsity"], meta["rounding"]) == ("float_sparse", 0.4, "l2")


@pytest.mark.parametrize("n_samples, warned", [(4, False), (4000, True)])
def test_windows_that_repeat_the_text_many_times_are_warned_of(n_samples, warned, tiny_dir, text_file, caplog):
    from transformers import AutoTokenizer

    with caplog.at_level(logging.WARNING, logger="sparsezip"):
        samples = calibration_samples(AutoTokenizer.from_pretrained(tiny_dir("llama")), [text_file], n_samples, 64)
    assert len(samples) == n_samples
    assert ("calibration windows of 64 tokens draw" in caplog.text) == warned
