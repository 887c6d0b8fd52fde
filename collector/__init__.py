"""The gradwatch collector: ingest, state, rules, sinks, exporter, server, CLI.

Never imports TensorFlow or the agent.
"""
