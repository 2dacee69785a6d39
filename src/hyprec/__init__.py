"""hyprec: hybrid-precision inference. Weights and activations in float32, attention in float16/bfloat16."""

from hyprec.entrypoints.llm import LLM
from hyprec.errors import HyprecError
from hyprec.outputs import CompletionOutput, RequestOutput
from hyprec.precision.policy import DtypePolicy, resolve_policy
from hyprec.sampling_params import SamplingParams
from hyprec.version import __version__

__all__ = [
    "LLM",
    "CompletionOutput",
    "DtypePolicy",
    "HyprecError",
    "RequestOutput",
    "SamplingParams",
    "__version__",
    "resolve_policy",
]
