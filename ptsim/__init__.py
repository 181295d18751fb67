"""ptsim: engine and command line."""
