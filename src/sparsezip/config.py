"""Model hyper-parameters read from a Hugging Face `config.json`, plus strict JSON helpers.

One frozen dataclass describes every supported decoder (Llama, Qwen2, Qwen3, Mistral); the
family only switches a few flags (qkv bias, per-head q/k norm), so the model code stays single.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .errors import SparsezipError

log = logging.getLogger("sparsezip")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, turning a missing or malformed file into a one-line user error."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SparsezipError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SparsezipError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SparsezipError(f"{path} must hold a JSON object")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 (and Llama with attention_bias) add a bias to q, k and v
    qk_norm: bool  # Qwen3 normalises every q and k head before RoPE
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # llama3 scaling, stored hashable
    sliding_window: int | None = None  # Mistral's local attention span

    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        """Build from a parsed config.json, checking every field the code reads (presence, type, range) first, so
        that a bad value is one line naming `source`, the field and what was expected."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise SparsezipError(
                f"unsupported model_type {model_type!r}; sparsezip supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias", False):
            raise SparsezipError("only SiLU-gated MLPs without bias are supported")
        field = _Fields(config, source)
        hidden, heads = field.size("hidden_size"), field.size("num_attention_heads", high=MAX_HEADS)
        kv_heads = field.size("num_key_value_heads", default=heads, high=MAX_HEADS)
        if heads % kv_heads:
            field.fail("num_key_value_heads", kv_heads, f"a divisor of num_attention_heads ({heads})")
        if config.get("head_dim") is None and hidden % heads:
            field.fail("num_attention_heads", heads, f"a divisor of hidden_size ({hidden}) when head_dim is not set")
        head_dim = field.size("head_dim", default=hidden // heads)
        if head_dim % 2:
            field.fail("head_dim", head_dim, "an even number (rotary embeddings pair the dimensions)")
        rope = _rope_parameters(config, field)
        window = None
        if config.get("use_sliding_window", model_type == "mistral"):
            window = field.size("sliding_window", default=None, high=MAX_POSITIONS)
        return cls(
            model_type=model_type,
            vocab_size=field.size("vocab_size", high=MAX_VOCAB),
            hidden_size=hidden,
            intermediate_size=field.size("intermediate_size"),
            num_layers=field.size("num_hidden_layers", high=MAX_LAYERS),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=field.number("rms_norm_eps", default=1e-6, high=1.0),
            rope_theta=field.number("rope_theta", default=10000.0, value=rope.get("rope_theta", 10000.0)),
            max_position_embeddings=field.size("max_position_embeddings", default=4096, high=MAX_POSITIONS),
            tie_word_embeddings=field.flag("tie_word_embeddings"),
            qkv_bias=model_type == "qwen2" or field.flag("attention_bias"),
            qk_norm=model_type == "qwen3",
            rope_scaling=_llama3_scaling(rope, field),
            sliding_window=window,
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelArgs":
        path = Path(model_dir) / "config.json"
        return cls.from_hf(read_json(path), str(path))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


# Upper bounds far above any real decoder: larger values are typos that would allocate terabytes.
MAX_SIZE, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, MAX_POSITIONS = 1 << 20, 1 << 12, 1 << 12, 1 << 24, 1 << 26
_REQUIRED = object()


class _Fields:
    """Typed, range-checked reads of config.json fields; a bad one raises a one-line error naming it."""

    def __init__(self, config: dict[str, Any], source: str):
        self.config, self.source = config, source

    def fail(self, name: str, value: Any, expected: str) -> None:
        shown = "missing" if value is _REQUIRED else repr(value)
        raise SparsezipError(f"{self.source}: {name} must be {expected}, got {shown}")

    def get(self, name: str, default: Any, expected: str) -> Any:
        value = self.config.get(name)
        if value is None:
            if default is _REQUIRED:
                self.fail(name, _REQUIRED, expected)
            return default
        return value

    def size(self, name: str, default: Any = _REQUIRED, high: int = MAX_SIZE) -> Any:
        expected = f"an integer from 1 to {high}"
        value = self.get(name, default, expected)
        if value is not default and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high):
            self.fail(name, value, expected)
        return value

    def number(self, name: str, default: float, high: float = math.inf, value: Any = None) -> float:
        expected = f"a number above 0{'' if high == math.inf else f' and below {high}'}"
        value = self.get(name, default, expected) if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < high:
            self.fail(name, value, expected)  # `not 0 < x` also refuses NaN
        return float(value)

    def flag(self, name: str) -> bool:
        value = self.config.get(name)
        if value is None:
            return False
        if not isinstance(value, bool):
            self.fail(name, value, "true or false")
        return value


def _rope_parameters(config: dict[str, Any], field: _Fields) -> dict[str, Any]:
    """transformers 5 nests RoPE settings in `rope_parameters`; older configs keep them flat."""
    rope: dict[str, Any] = {}
    for name in ("rope_scaling", "rope_parameters"):
        value = config.get(name) or {}
        if not isinstance(value, dict):
            field.fail(name, value, "an object")
        rope.update(value)
    if "rope_theta" in config:
        rope.setdefault("rope_theta", config["rope_theta"])
    return rope


def _llama3_scaling(rope: dict[str, Any], field: _Fields) -> tuple[tuple[str, Any], ...] | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise SparsezipError(f"RoPE scaling {kind!r} is not supported (only default and llama3)")
    scaling = _Fields(rope, f"{field.source}: rope_scaling")
    values = {k: scaling.number(k, default=_REQUIRED) for k in ("factor", "low_freq_factor", "high_freq_factor")}
    if values["high_freq_factor"] <= values["low_freq_factor"]:
        scaling.fail("high_freq_factor", values["high_freq_factor"],
                     f"above low_freq_factor ({values['low_freq_factor']})")
    values["original_max_position_embeddings"] = scaling.size("original_max_position_embeddings", high=MAX_POSITIONS)
    return tuple(values.items())


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim/2], with Llama-3 wavelength-dependent scaling when configured."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if args.rope_scaling is None:
        return inv_freq
    s = dict(args.rope_scaling)
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"]
    )
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def part_file_bytes(gigabytes: float) -> int:
    """--part_file_size, GB per output safetensors shard, in bytes: a positive, finite size."""
    if not 0 < gigabytes < math.inf:  # also refuses NaN
        raise SparsezipError(f"--part_file_size must be a positive number of GB, got {gigabytes}")
    return max(1, int(gigabytes * 2**30))


@dataclass(frozen=True)
class OwlConfig:
    """OWL (Yin et al. 2024): layers with more activation outliers get less sparsity."""

    threshold: float = 5.0  # an outlier's Wanda score exceeds threshold x its layer's mean
    lam: float = 0.08  # largest deviation of a layer's sparsity from the target

    def check(self, sparsity: float) -> None:
        """A layer's sparsity moves at most 2 x lam from the target (calibrate.owl_allocation: outlier ratios
        spread over [0, 2 lam], minus their mean), and must stay in [0, 1): a layer left dense or all zeros would
        otherwise be recorded as an allocation."""
        if not 0 < self.threshold < math.inf:  # also refuses NaN
            raise SparsezipError(f"--owl_threshold must be a positive number, got {self.threshold}")
        if not (0 <= self.lam and 2 * self.lam <= sparsity and sparsity + 2 * self.lam < 1):  # also refuses NaN
            raise SparsezipError(f"--owl_lambda must keep every layer's sparsity in [0, 1): at --sparsity "
                                 f"{sparsity} it must be in [0, {min(sparsity, 1 - sparsity) / 2:g}), "
                                 f"got {self.lam}")


@dataclass(frozen=True)
class SparsifyConfig:
    """How sparsify prunes: validated once (`checked`), carried through calibration and the pruners, and
    recorded in the output folder's description (`metadata`), so a folder tells how it was made."""

    method: str = "float_sparse"
    sparsity: float = 0.5
    pattern: str = "unstructured"  # or N:M such as 2:4
    rounding: str | None = None  # "l2" or "none"; None = the method's default (l2 for float_sparse)
    # what float_sparse's update fits: "local", the linear's own dense weights on the pruned model's inputs (the
    # original), or "dense", the dense model's outputs of the linear
    targets: str = "local"
    # with dense targets, the share of the target taken from the dense model's outputs; the rest is the linear's own
    # output on the pruned inputs (pruners.float_sparse)
    target_blend: float = 1.0
    # float_sparse's ADMM penalty on the normalised Hessian: 1 is the original's (see pruners.float_sparse)
    admm_rho: float = 1.0
    # what float_sparse's mask ranks: "matrix", each whole matrix (the original), or "row", each output row
    mask_scope: str = "matrix"
    # float_sparse's relative damping: a number (0.1, the original's) or "auto" (pruners.float_sparse_damping)
    admm_damp: float | str = 0.1
    # what float_sparse's mask ranks its entries by: "magnitude" (the original) or "obs" (pruners.float_sparse)
    mask_score: str = "magnitude"
    calib: tuple[Path, ...] = ()
    calib_samples: int = 32
    calib_seqlen: int = 512
    seed: int = 0
    owl: OwlConfig | None = None
    device: str = "cpu"
    part_file_size: float = 5.0  # GB per output safetensors shard

    def __post_init__(self) -> None:
        object.__setattr__(self, "calib", tuple(Path(c) for c in self.calib))  # lists are welcome too

    @property
    def nm(self) -> tuple[int, int] | None:
        from .masks import parse_pattern

        return parse_pattern(self.pattern)

    @property
    def rounding_mode(self) -> str:
        return self.rounding or ("l2" if self.method == "float_sparse" else "none")

    def checked(self, args: ModelArgs) -> SparsifyConfig:
        """Refuse impossible settings before any calibration work, so a typo costs a second, not a run."""
        from .pruners import FLOAT_SPARSE_DAMPING, MASK_SCORES, damping_setting, get_method

        method = get_method(self.method)
        if not 0.0 <= self.sparsity < 1.0:  # also refuses NaN
            raise SparsezipError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        nm = self.nm
        widths = sorted({args.hidden_size, args.q_size, args.intermediate_size})  # inputs of the 7 pruned linears
        if nm is not None and any(width % nm[1] for width in widths):
            raise SparsezipError(f"--pattern {nm[0]}:{nm[1]} needs input widths divisible by {nm[1]}, "
                                 f"but this model's pruned linears have {', '.join(map(str, widths))}")
        if self.calib_samples < 1:
            raise SparsezipError(f"--calib_samples must be at least 1, got {self.calib_samples}")
        if self.calib_seqlen < 2:
            raise SparsezipError(f"--calib_seqlen must be at least 2 tokens, got {self.calib_seqlen}")
        part_file_bytes(self.part_file_size)
        if self.rounding_mode not in ("l2", "none"):
            raise SparsezipError(f"--rounding must be l2 or none, got {self.rounding!r}")
        if self.targets not in ("dense", "local"):
            raise SparsezipError(f"--targets must be dense or local, got {self.targets!r}")
        if self.targets == "dense" and self.method != "float_sparse":
            raise SparsezipError(f"--targets dense needs --method float_sparse (the only method that refits the "
                                 f"weights to a target), not {self.method}")
        if not 0.0 < self.target_blend <= 1.0:  # also refuses NaN
            raise SparsezipError(f"--target_blend must be in (0, 1], got {self.target_blend}")
        if self.target_blend != 1.0 and self.targets != "dense":
            raise SparsezipError("--target_blend mixes the dense model's outputs into float_sparse's target: it "
                                 "needs --targets dense")
        if not 0.0 < self.admm_rho < math.inf:  # also refuses NaN
            raise SparsezipError(f"--admm_rho must be a positive number, got {self.admm_rho}")
        if self.admm_rho != 1.0 and self.method != "float_sparse":
            raise SparsezipError(f"--admm_rho is float_sparse's ADMM penalty; --method {self.method} has none")
        if self.admm_damp != FLOAT_SPARSE_DAMPING:
            damping_setting(str(self.admm_damp))  # refuses what is neither auto nor a positive number
            if self.method != "float_sparse":
                raise SparsezipError(f"--admm_damp is float_sparse's damping; --method {self.method} has its own")
        if self.mask_scope not in ("matrix", "row"):
            raise SparsezipError(f"--mask_scope must be matrix or row, got {self.mask_scope!r}")
        if self.mask_scope != "matrix" and self.method != "float_sparse":
            raise SparsezipError(f"--mask_scope chooses float_sparse's mask ranking; --method {self.method} ranks "
                                 f"its own way")
        if self.mask_scope != "matrix" and nm is not None:
            raise SparsezipError(f"--mask_scope row applies to unstructured masks; an {nm[0]}:{nm[1]} mask already "
                                 f"prunes every row alike")
        if self.mask_score not in MASK_SCORES:
            raise SparsezipError(f"--mask_score must be {' or '.join(MASK_SCORES)}, got {self.mask_score!r}")
        if self.mask_score != MASK_SCORES[0] and self.method != "float_sparse":
            raise SparsezipError(f"--mask_score chooses float_sparse's mask score; --method {self.method} scores "
                                 f"its own way")
        if self.owl is not None and (nm is not None or not method.calibrated):
            raise SparsezipError("--owl allocates unstructured sparsity from activations: it needs a calibrated "
                                 "method (wanda, sparsegpt, float_sparse) and --pattern unstructured")
        if self.owl is not None:
            self.owl.check(self.sparsity)
        if method.calibrated and not self.calib:
            raise SparsezipError(f"method {self.method} needs calibration text: pass --calib FILE")
        if method.calibrated and self.calib_seqlen > args.max_position_embeddings:
            log.warning("calibration windows cut from %d to the model's context of %d tokens", self.calib_seqlen,
                        args.max_position_embeddings)
            return replace(self, calib_seqlen=args.max_position_embeddings)
        return self

    def metadata(self, tokens: int, samples: int, layer_sparsity: list[float], provenance: dict) -> dict:
        """The description's record of this run; `provenance` says from what, with which tool, when."""
        record = {"method": self.method, "sparsity": self.sparsity, "pattern": self.pattern,
                  "rounding": self.rounding_mode, "targets": self.targets, "calibration_tokens": tokens,
                  "calibration_samples": samples,
                  "calibration_files": [Path(c).name for c in self.calib], **provenance}
        if self.method == "float_sparse":
            record["admm_rho"] = self.admm_rho
            record["mask_scope"] = self.mask_scope
            record["admm_damp"] = self.admm_damp
            record["mask_score"] = self.mask_score
        if self.targets == "dense":
            record["target_blend"] = self.target_blend
        if self.owl is not None:
            record["owl"] = {"threshold_m": self.owl.threshold, "lambda": self.owl.lam,
                             "layer_sparsity": [round(x, 6) for x in layer_sparsity]}
        return record
