"""Runs vLLM's offline LLM on a folder in a process of its own and prints one JSON line: the greedy tokens for the
given prompt ids and, per worker, the linears held in the sparse layout. A process per run because vLLM's engine
and its TP workers are not meant to be started twice in one interpreter."""

from __future__ import annotations

import argparse
import json

from vllm import LLM, SamplingParams

from sparsezip.integrations.vllm import sparse_linears


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--prompt_ids", required=True, help="JSON list of token ids")
    parser.add_argument("--max_tokens", type=int, default=16)
    ns = parser.parse_args()
    llm = LLM(model=ns.folder, dtype="float32", enforce_eager=True, tensor_parallel_size=ns.tp, max_model_len=512,
              generation_config="vllm", seed=0)
    output = llm.generate([{"prompt_token_ids": json.loads(ns.prompt_ids)}],
                          SamplingParams(temperature=0, max_tokens=ns.max_tokens), use_tqdm=False)[0].outputs[0]
    workers = llm.apply_model(sparse_linears)
    print("RESULT " + json.dumps({"tokens": list(output.token_ids), "finish_reason": output.finish_reason,
                                  "quantization": llm.llm_engine.model_config.quantization, "workers": workers}))


if __name__ == "__main__":
    main()
