"""Serving sketched checkpoints with inference engines (vLLM: :mod:`.vllm_plugin`)."""


def register_vllm() -> None:
    """vLLM's ``vllm.general_plugins`` entry point; imports vLLM only when vLLM itself calls it."""
    from .vllm_plugin import register

    register()
