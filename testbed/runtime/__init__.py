"""Runtimes that bring a plan up as nodes on shaped links: Docker containers or local processes.

Public API: :class:`RunningTestbed` / :class:`NodeEndpoint` and :func:`load_running` (what the
broker needs); the runtime interface and its registry in :mod:`testbed.runtime.interface`
(``RUNTIMES``, one file per runtime under :mod:`testbed.runtime.kinds`); in
:mod:`testbed.runtime.control` ``bring_up``, ``detach``, ``down_sync``, ``clean_sync``,
``set_link``, ``set_node_cpu``.
"""

from testbed.runtime.base import NodeEndpoint, RunningTestbed, load_running

__all__ = ["NodeEndpoint", "RunningTestbed", "load_running"]
