"""bench/layer_error.py: method specs reach the pruner's keyword arguments, bad specs are refused, and the
held-out error is the relative output error it claims to be."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import layer_error  # noqa: E402


def test_float_sparse_settings_become_pruner_keywords():
    assert layer_error.parse_method("sparsegpt") == ("sparsegpt", {})
    name, kwargs = layer_error.parse_method("float_sparse:rho=0.6,mask_scope=row,iters=40")
    assert name == "float_sparse"
    assert kwargs == {"rho": 0.6, "row_masks": True, "iters": 40}
    assert layer_error.parse_method("float_sparse:mask_scope=matrix")[1] == {"row_masks": False}
    assert layer_error.parse_method("float_sparse:damp=auto")[1] == {"damp": "auto"}
    assert layer_error.parse_method("float_sparse:damp=0.3")[1] == {"damp": 0.3}


@pytest.mark.parametrize("spec", ["nope", "float_sparse:bad=1", "float_sparse:mask_scope=col", "wanda:rho=1",
                                  "float_sparse:rho=high", "float_sparse:damp=0", "float_sparse:iters=1.5"])
def test_bad_specs_exit_with_a_message(spec):
    with pytest.raises(SystemExit) as e:
        layer_error.parse_method(spec)
    assert spec in str(e.value)


def test_held_out_error_is_relative_output_energy_lost():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    pruned = torch.tensor([[0.0, 4.0], [1.0, 0.0]])  # channel 0 loses 9 of its 25; channel 1 loses nothing
    rel, worst = layer_error.held_out_error(w, pruned, x)
    assert rel == pytest.approx(9 / 26)
    assert worst == pytest.approx(9 / 25)
    assert layer_error.held_out_error(w, w, x) == (0.0, 0.0)


def test_prune_once_reaches_the_sparsity_from_calibration_inputs():
    torch.manual_seed(0)
    w, x = torch.randn(8, 16), torch.randn(256, 16)
    stats = layer_error.input_stats(x)
    pruned = layer_error.prune_once("float_sparse:mask_scope=row", w, stats, 0.5)
    again = layer_error.prune_once("float_sparse:mask_scope=row", w, stats, 0.5)
    assert torch.equal(pruned, again)  # the statistics survive a pruner call, so methods can share them
    assert ((pruned == 0).sum(1) == 8).all()  # row masks: half of every row
    assert layer_error.held_out_error(w, pruned, x)[0] < layer_error.held_out_error(w, w * (pruned != 0), x)[0]


def test_capture_stops_after_the_last_chosen_layer_and_keeps_each_shared_input():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config).eval()
    ran = []
    model.model.layers[3].register_forward_hook(lambda *_: ran.append(3))
    samples = [torch.arange(10), torch.arange(5, 12)]
    inputs = layer_error.capture_inputs(model, [0, 1], samples)
    assert not ran  # layer 3 never ran: the forward stopped after layer 1
    assert inputs[(1, "mlp.down_proj")].shape == (17, 32)  # every token of both samples, the MLP's width
    with torch.no_grad():  # the layer-0 input of q_proj is the input layernorm of the embeddings
        expected = model.model.layers[0].input_layernorm(model.model.embed_tokens(samples[0]))
    torch.testing.assert_close(inputs[(0, "self_attn.q_proj")][:10], expected)


def test_bad_layers_and_missing_files_exit_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        layer_error.main(["--model_path", str(tmp_path), "--layers", "ten", "--calib", "a", "--held_out", "b"])
    assert "--layers 'ten'" in str(e.value)
    with pytest.raises(SystemExit) as e:
        layer_error.main(["--model_path", str(tmp_path), "--calib", str(tmp_path / "none.txt"), "--held_out", "b"])
    assert str(e.value).startswith("layer_error: ")
