"""``shunt demo``: the whole pipeline on one machine, ending in what it cost and what it saved.

Owns the run's options and topics, the review stream in, the tally of outputs read back, the run and its summary."""

from consumer.sandbox.demo.options import DemoError, DemoOptions, RunInfo, Topics, check_model, demo_settings
from consumer.sandbox.demo.reader import OutputReader
from consumer.sandbox.demo.run import Demo, run_demo
from consumer.sandbox.demo.stream import StreamProducer, create_topics, delete_run
from consumer.sandbox.demo.summary import Money, Snapshot, Summary, View, money, summarise
from consumer.sandbox.demo.tally import Tally, Truth, make_truth, standin_config, write_labels

__all__ = [
    "Demo",
    "DemoError",
    "DemoOptions",
    "Money",
    "OutputReader",
    "RunInfo",
    "Snapshot",
    "StreamProducer",
    "Summary",
    "Tally",
    "Topics",
    "Truth",
    "View",
    "check_model",
    "create_topics",
    "delete_run",
    "demo_settings",
    "make_truth",
    "money",
    "run_demo",
    "standin_config",
    "summarise",
    "write_labels",
]
