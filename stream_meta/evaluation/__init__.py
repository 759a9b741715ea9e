"""Offline evaluation: few-shot protocol (and, later, replay-based comparison of strategies)."""
