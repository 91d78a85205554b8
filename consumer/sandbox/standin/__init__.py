"""The stand-in OpenAI-compatible Chat Completions server for tests, the demo and benchmarks.

Owns its config and answer policies, handlers and wire format, own rate limits and faults, and ``/stats``."""

from consumer.offline.labels import LabelBook
from consumer.sandbox.standin.app import DISTRACTORS, StandinApp
from consumer.sandbox.standin.config import Faults, PolicyName, StandinConfig, apply_control, parse_latency
from consumer.sandbox.standin.limits import WINDOW_S, go_duration
from consumer.sandbox.standin.policies import FirstPolicy, OraclePolicy, Policy, ReplayPolicy, make_policy
from consumer.sandbox.standin.server import StandinServer

__all__ = [
    "DISTRACTORS",
    "WINDOW_S",
    "Faults",
    "FirstPolicy",
    "LabelBook",
    "OraclePolicy",
    "Policy",
    "PolicyName",
    "ReplayPolicy",
    "StandinApp",
    "StandinConfig",
    "StandinServer",
    "apply_control",
    "go_duration",
    "make_policy",
    "parse_latency",
]
