"""One file per runtime, registered by name in :data:`testbed.runtime.interface.RUNTIMES`."""
