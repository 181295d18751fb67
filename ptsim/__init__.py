"""ptsim: a concurrency simulator for the Linux kernel's page-table lifetime protocols."""

__version__ = "0.2.0"
