"""Matmul FLOPs of a step, counted on its jaxpr: every `dot_general`, with loops expanded.

XLA's `cost_analysis()` counts the body of a while loop once, whatever its trip count, so for a
step whose layers are one `lax.scan` (`LlamaConfig.scan_layers=True`), or that accumulates
microbatches (another scan), it reports a fraction of the work (1/32 of the layers of Llama 3.1
8B). This counts the traced step instead: 2 * M * N * K for each matmul, times the length of
every scan around it, including the forward pass a remat policy recomputes (it is in the
backward jaxpr) and both branches' maximum for a `cond`. A `while` loop of unknown length is
counted once and reported. Elementwise work (norms, softmax, the optimizer) is left out: it is
a few percent of a transformer step's FLOPs.
"""

from __future__ import annotations

import math
from typing import Any

from jax import core


def _sub_jaxprs(value: Any) -> list:
    if hasattr(value, "eqns"):
        return [value]
    if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        return [value.jaxpr]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _dot_flops(eqn: core.JaxprEqn) -> float:
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)


def matmul_flops(jaxpr: Any) -> tuple[float, int]:
    """(matmul FLOPs of `jaxpr` with scans expanded, the number of while loops counted once)."""
    total, whiles = 0.0, 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
            continue
        if name == "cond":
            counts = [matmul_flops(j) for j in _sub_jaxprs(eqn.params["branches"])]
            total += max(c[0] for c in counts)
            whiles += max(c[1] for c in counts)
            continue
        times = eqn.params.get("length", 1) if name == "scan" else 1
        whiles += name == "while"
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                flops, inner = matmul_flops(sub)
                total, whiles = total + times * flops, whiles + inner
    return total, whiles
