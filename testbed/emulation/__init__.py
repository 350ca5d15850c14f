"""Emulated devices: a node *is* the device of its profile running the studied model's blocks,
in time, while a stand-in with the same structure computes the real outputs.

- :mod:`.timing` (pure): a step's predicted seconds and a node's KV capacity.
- :mod:`.standin`: the generated stand-in model folder.
- :mod:`.executor`: the paced, padded executor the stage server runs.
- :mod:`.fidelity`: per-run pacing fidelity (overruns, pacing error) from the stages' reports.
- :mod:`.plumbing`: the `stage serve --emulate` arguments of every node of a plan.
"""
