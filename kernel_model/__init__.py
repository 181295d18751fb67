"""The simulated machine and the kernel objects it holds."""
