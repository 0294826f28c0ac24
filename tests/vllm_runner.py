"""Run by ``test_vllm_plugin.py`` under a Python that has vLLM (its own environment: vLLM pins transformers).

    python tests/vllm_runner.py MODEL_DIR OUT.json PROMPT...

Greedy-decodes each prompt with ``vllm.LLM`` (CPU, fp32, eager) and writes the token ids and the top-5
log-probabilities per step. The sketchtune plugin is found through its ``vllm.general_plugins`` entry point.
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    model, out, prompts = sys.argv[1], sys.argv[2], sys.argv[3:]
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4, seed=0)
    quant = llm.llm_engine.model_config.quantization
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, logprobs=5))
    rows = [{"prompt": o.prompt, "prompt_ids": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids),
             "logprobs": [{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs]}
            for o in outputs]
    with open(out, "w") as f:
        json.dump({"quantization": quant, "rows": rows}, f)


if __name__ == "__main__":  # vLLM starts worker processes: the guard is required
    main()
