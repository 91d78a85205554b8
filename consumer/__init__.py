"""Data Shunt: a small model answers what it is sure of; only the uncertain rest goes to the LLM."""

__version__ = "0.1.0"
