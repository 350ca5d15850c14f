"""Edge-fog-cloud testbed for pipelined LLM inference.

Layers (each a folder):
  pure data      spec/ (topology, scenario, device catalog, model profile, plan), workload/
  pure policies  cost/, partition/, schedule/
  I/O            model/, stage/, net/, runtime/
  orchestration  broker/, cli/
"""

__version__ = "0.1.0"
