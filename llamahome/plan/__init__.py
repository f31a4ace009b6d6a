"""Pod plans without the pod: a training run compiled ahead of time for a TPU topology (libtpu
on a CPU host). topology: names, chips, compile-only devices; shardings: the table of every
state leaf; flops: matmul FLOPs of a jaxpr; jobs: the `plan` job. The planning itself (compile,
memory, time, the fit search) is llamahome/train/plan.py."""
