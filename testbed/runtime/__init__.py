"""Runtimes that bring a plan up as nodes on shaped links: Docker containers or local processes.

Public API: :class:`RunningTestbed` / :class:`NodeEndpoint` and :func:`load_running` (what the
broker needs), and in :mod:`testbed.runtime.control` ``up_docker``, ``down_sync``,
``clean_sync``, ``set_link``, ``set_node_cpu``; ``testbed.runtime.localrun.up_local``.
"""

from testbed.runtime.base import NodeEndpoint, RunningTestbed, load_running

__all__ = ["NodeEndpoint", "RunningTestbed", "load_running"]
