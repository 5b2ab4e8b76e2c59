"""lm-evaluation-harness on sparsezip's runtime: any folder kind (dense, W16A16S, W16A16SC of one part) in any
weight layout, registered as model "sparsezip".

    python -m sparsezip.integrations.lm_eval_model --model sparsezip \\
        --model_args pretrained=FOLDER,weights=compressed --tasks ...

(the harness has no plugin discovery, so this entry point imports this module and then runs lm_eval's own
command line), or `lm_eval.simple_evaluate(model=SparsezipLM(pretrained=FOLDER), ...)`.

Scoring follows the harness's `hf` model request by request (same token windows, same truncation, same
tokenizer calls), so a dense folder scores what `--model hf` scores on it, up to fp32 rounding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, resolve_max_length
from tqdm import tqdm
from transformers import AutoConfig

from .. import layouts
from ..config import ModelArgs
from ..data import auto_tokenizer
from ..errors import SparsezipError
from ..formats import check_model_dir
from ..generate import SamplingParams, generate_batch, stop_ids
from ..runtime import load_model, pick_device

NAME = "sparsezip"


OPTIONS = ("pretrained", "weights", "device", "max_length", "max_gen_toks", "add_bos_token", "batch_size")


@register_model(NAME)
class SparsezipLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, weights: str = layouts.AUTO, device: str | None = "cpu",
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, **unknown):
        """`batch_size` (requests are scored one by one) and `max_batch_size` (which the harness passes itself) are
        checked and otherwise unused; any other name is refused, so a typo does not silently keep a default."""
        super().__init__()
        if unknown:
            raise SparsezipError(f"unknown model_args {', '.join(sorted(unknown))}; sparsezip takes "
                                 f"{', '.join(OPTIONS)}")
        if pretrained is None:
            raise SparsezipError("model_args needs pretrained=FOLDER")
        if not (isinstance(batch_size, str) and batch_size.startswith("auto")):
            whole_number("batch_size", batch_size, 1)
        self.folder = check_model_dir(Path(pretrained))
        context = ModelArgs.from_dir(self.folder).max_position_embeddings
        if max_length is not None:
            whole_number("max_length", max_length, 2, context)
        self.max_gen_toks = whole_number("max_gen_toks", max_gen_toks, 1)
        self.model = load_model(self.folder, device=harness_device(device), weights=weights)
        self.tokenizer = auto_tokenizer(self.folder)
        self.stops = stop_ids(self.tokenizer, self.folder)
        self._max_length = max_length or int(resolve_max_length(AutoConfig.from_pretrained(self.folder),
                                                                 self.tokenizer))
        self.add_bos_token = add_bos_token

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False  # the text already starts with BOS
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding would produce the continuation)."""
        answers = []
        for cache_key, context, continuation in tqdm(requests, disable=disable_tqdm, desc="sparsezip loglikelihood"):
            answer = self.score(context, continuation)
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
            answers.append(answer)
        return answers

    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        if not continuation:
            raise SparsezipError("a loglikelihood request has an empty continuation: there is nothing to score")
        if len(continuation) > self.max_length:
            raise SparsezipError(f"a loglikelihood continuation of {len(continuation)} tokens is longer than "
                                 f"max_length {self.max_length}")
        whole = (context + continuation)[-(self.max_length + 1):]
        with torch.inference_mode():
            logits = self.model(torch.tensor([whole[:-1]]))[0, -len(continuation):]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(whole[-len(continuation):])
        greedy = bool((logprobs.argmax(dim=-1) == target).all())
        return float(logprobs.gather(1, target[:, None]).sum()), greedy

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in the harness's disjoint windows of max_length tokens."""
        totals = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="sparsezip rolling"):
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))
            total = sum(self.score(context, continuation)[0] for context, continuation in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            totals.append(total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        eos_text = self.tokenizer.decode(self.eot_token_id)
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="sparsezip generate"):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise SparsezipError(f"max_gen_toks {max_new} must be below the model's max_length {self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            params = SamplingParams(max_new_tokens=max_new, temperature=float(kwargs.get("temperature", 0.0)),
                                    stop=tuple(until))
            text = generate_batch(self.model, self.tokenizer, [ids], params, self.stops)[0].text
            for stop in until:  # what the harness's hf model returns: the text before the first stop string
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            outputs.append(text)
        return outputs


def whole_number(name: str, value, low: int, high: int | None = None) -> int:
    """A model_args number (the harness passes what it could not parse as a string)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise SparsezipError(f"model_args {name} must be a whole number {bounds}, got {value!r}")
    return value


def harness_device(device: str | None) -> str:
    """The harness's command line asks for "cuda" by default; like its hf model, use the CPU when there is none."""
    if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
        return "cpu"
    return pick_device(device)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except SparsezipError as e:  # a bad folder or setting: one line, like every sparsezip command
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
