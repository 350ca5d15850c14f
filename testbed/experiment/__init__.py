"""Experiments (orchestration): scenario -> plan -> testbed -> broker -> results folder.

- :mod:`~testbed.experiment.models`: the weights a run executes (the generated tiny model,
  cached once).
- :mod:`~testbed.experiment.prepare`: plan and workload of a run, before any I/O on nodes.
- :mod:`~testbed.experiment.lifecycle`: bring a testbed up for a run, or attach to one.
- :mod:`~testbed.experiment.replay`: one replay and its results folder (records streamed).
- :mod:`~testbed.experiment.compare`: several policy pairs on the same workload.
- :mod:`~testbed.experiment.provenance`: versions, git revision, resolved config.
"""
