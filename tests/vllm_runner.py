"""Run by ``test_vllm_plugin.py`` under a Python that has vLLM (its own environment: vLLM pins transformers).

    python tests/vllm_runner.py OUT.json MODEL_DIR [MODEL_DIR ...] -- PROMPT...

Greedy-decodes each prompt with ``vllm.LLM`` (CPU, fp32, eager) for each model in turn, in one process (vLLM's
import and start-up are most of the cost), and writes per model the token ids and the top-5 log-probabilities
per step. The sketchtune plugin is found through its ``vllm.general_plugins`` entry point.
"""

import gc
import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    out, rest = sys.argv[1], sys.argv[2:]
    split = rest.index("--")
    models, prompts = rest[:split], rest[split + 1:]
    results = {}
    for model in models:
        llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4, seed=0)
        quant = llm.llm_engine.model_config.quantization
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, logprobs=5))
        rows = [{"prompt": o.prompt, "prompt_ids": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids),
                 "logprobs": [{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs]}
                for o in outputs]
        results[model] = {"quantization": quant, "rows": rows}
        llm.llm_engine.engine_core.shutdown()  # one engine at a time: free its worker and KV cache first
        del llm
        gc.collect()
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":  # vLLM starts worker processes: the guard is required
    main()
