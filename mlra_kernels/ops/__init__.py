"""One sub-package per op: reference, Triton or native kernels, launcher, autograd op, public call."""
