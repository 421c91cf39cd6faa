"""lr_at(table, t): the in-kernel schedule evaluator (mirrors kernels/schedule.cuh); called
from Python through ``fastopt.schedules.host_lr``.

``table`` is a ``fastopt.schedules`` segment table (rows ``[kind, start, origin, p0..p5]``);
``t`` the 0-based step as float64. Scalar, evaluated once per kernel call.
"""

import math

from ._jit import helper

CONSTANT, POLYNOMIAL, INVERSE_TIME, EXPONENTIAL, LADDER, COSINE, COSINE_RESTARTS, CYCLIC = range(8)


@helper
def lr_at(table, t):
    """Learning rate at 0-based step t from the last row with start <= t."""
    row = 0
    while row + 1 < table.shape[0] and table[row + 1, 1] <= t:
        row += 1
    kind = int(table[row, 0])
    x = t - table[row, 2]
    p = table[row, 3:]
    if kind == CONSTANT:
        return p[0]
    if kind == POLYNOMIAL:  # (lr - end) * (1 - min(x, T) / T) ** power + end
        frac = 1.0 - min(max(x, 0.0), p[2]) / p[2]
        return (p[0] - p[1]) * frac ** p[3] + p[1]
    if kind == INVERSE_TIME:  # lr / (1 + rate * x / steps)
        e = math.floor(x / p[2]) if p[3] != 0.0 else x / p[2]
        return p[0] / (1.0 + p[1] * e)
    if kind == EXPONENTIAL:  # lr * rate ** (x / steps)
        e = math.floor(x / p[2]) if p[3] != 0.0 else x / p[2]
        return p[0] * p[1] ** e
    if kind == LADDER:  # max(min_lr, lr - drop * floor(x / every))
        return max(p[3], p[0] - p[1] * math.floor(x / p[2]))
    if kind == COSINE:  # end + (lr - end) * (1 + cos(pi * min(x, T) / T)) / 2
        x = min(max(x, 0.0), p[2])
        return p[1] + (p[0] - p[1]) * (1.0 + math.cos(math.pi * x / p[2])) / 2.0
    if kind == COSINE_RESTARTS:  # cosine within periods T0, T0*m, T0*m^2, ...
        period = p[2]
        if p[3] == 1.0:
            x = x - period * math.floor(x / period)
        else:
            while x >= period:
                x -= period
                period *= p[3]
        return p[1] + (p[0] - p[1]) * (1.0 + math.cos(math.pi * x / period)) / 2.0
    if kind == CYCLIC:  # torch CyclicLR: base + (max - base) * scale(x) * factor(cycle or x)
        total = p[2] + p[3]
        cycle = math.floor(1.0 + x / total)
        pos = 1.0 + x / total - cycle
        ratio = p[2] / total
        scale = pos / ratio if pos <= ratio else (pos - 1.0) / (ratio - 1.0)
        if p[4] == 0.0:
            factor = 1.0
        elif p[4] == 1.0:
            factor = 1.0 / 2.0 ** (cycle - 1.0)
        else:
            factor = p[5] ** x
        return p[0] + (p[1] - p[0]) * scale * factor
    return math.nan
