"""Discrete-event simulation of a scenario in simulated time (``testbed simulate``).

The same objects the broker uses decide (planner, scheduler instances, the shared
:class:`~testbed.schedule.ledger.Ledger`, the cost model's :class:`WorkPredictor`); what the
stage servers and links would do is modelled:

- :mod:`testbed.sim.steps`: how long one prefill or decode step takes on a node (cost model, or
  a calibrated profile from ``testbed calibrate``);
- :mod:`testbed.sim.links`: each inter-tier link as two FIFO pipes (one per direction),
  bandwidth occupancy plus one-way delay;
- :mod:`testbed.sim.engine`: the event loop (nodes as stage servers: FIFO, in-flight cap,
  KV-cache capacity), with exact shortcuts; :mod:`testbed.sim.fastpath` its event loop with
  the hot paths written out; :mod:`testbed.sim.state` its data,
  :mod:`testbed.sim.records` the records and outcome it writes;
  :mod:`testbed.sim.batching` continuous batching (``max_batch``);
  :mod:`testbed.sim.reference` the first event-per-step engine, kept to test that the
  shortcuts change no record;
- :mod:`testbed.sim.run`: scenario -> plan (``replay``'s preparation) -> simulation -> the
  same run folder as ``replay``;
- :mod:`testbed.sim.sweep` and :mod:`testbed.sim.calibrate`: ``testbed sweep`` and
  ``testbed calibrate``.
"""
