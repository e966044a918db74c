"""The ``pp-media`` command: ``demo`` (pipelined training beside a reference) and ``inspect``."""
