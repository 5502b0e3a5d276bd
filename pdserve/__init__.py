"""pdserve: LLM serving with prefill and decode disaggregated."""
from pdserve.engine.request import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):  # keep `import pdserve` light: the router must not pull in torch
    if name == "LLM":
        from pdserve.llm import LLM
        return LLM
    raise AttributeError(name)
