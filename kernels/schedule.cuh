// lr_at(table, rows, t): the in-kernel schedule evaluator (mirrors fastopt/cpu/schedule.py).
// table: rows x 9 doubles [kind, start, origin, p0..p5]; t: the 0-based step.
#pragma once
#include "common.cuh"

#define TABLE_COLUMNS 9
enum ScheduleKind {
    CONSTANT, POLYNOMIAL, INVERSE_TIME, EXPONENTIAL, LADDER, COSINE, COSINE_RESTARTS, CYCLIC
};

// Learning rate at 0-based step t from the last row with start <= t.
FO_HD double lr_at(const double* table, int rows, double t) {
    int row = 0;
    while (row + 1 < rows && table[(row + 1) * TABLE_COLUMNS + 1] <= t) row += 1;
    const double* r = table + row * TABLE_COLUMNS;
    const int kind = (int)r[0];
    double x = t - r[2];
    const double* p = r + 3;
    const double pi = 3.141592653589793;
    if (kind == CONSTANT) return p[0];
    if (kind == POLYNOMIAL) {  // (lr - end) * (1 - min(x, T) / T) ** power + end
        const double frac = 1.0 - fmin(fmax(x, 0.0), p[2]) / p[2];
        return (p[0] - p[1]) * pow(frac, p[3]) + p[1];
    }
    if (kind == INVERSE_TIME) {  // lr / (1 + rate * x / steps)
        const double e = p[3] != 0.0 ? floor(x / p[2]) : x / p[2];
        return p[0] / (1.0 + p[1] * e);
    }
    if (kind == EXPONENTIAL) {  // lr * rate ** (x / steps)
        const double e = p[3] != 0.0 ? floor(x / p[2]) : x / p[2];
        return p[0] * pow(p[1], e);
    }
    if (kind == LADDER) {  // max(min_lr, lr - drop * floor(x / every))
        return fmax(p[3], p[0] - p[1] * floor(x / p[2]));
    }
    if (kind == COSINE) {  // end + (lr - end) * (1 + cos(pi * min(x, T) / T)) / 2
        x = fmin(fmax(x, 0.0), p[2]);
        return p[1] + (p[0] - p[1]) * (1.0 + cos(pi * x / p[2])) / 2.0;
    }
    if (kind == COSINE_RESTARTS) {  // cosine within periods T0, T0*m, T0*m^2, ...
        double period = p[2];
        if (p[3] == 1.0) {
            x = x - period * floor(x / period);
        } else {
            while (x >= period) {
                x -= period;
                period *= p[3];
            }
        }
        return p[1] + (p[0] - p[1]) * (1.0 + cos(pi * x / period)) / 2.0;
    }
    if (kind == CYCLIC) {  // torch CyclicLR: base + (max - base) * scale(x) * factor(cycle or x)
        const double total = p[2] + p[3];
        const double cycle = floor(1.0 + x / total);
        const double pos = 1.0 + x / total - cycle;
        const double ratio = p[2] / total;
        const double scale = pos <= ratio ? pos / ratio : (pos - 1.0) / (ratio - 1.0);
        double factor;
        if (p[4] == 0.0) {
            factor = 1.0;
        } else if (p[4] == 1.0) {
            factor = 1.0 / pow(2.0, cycle - 1.0);
        } else {
            factor = pow(p[5], x);
        }
        return p[0] + (p[1] - p[0]) * scale * factor;
    }
    return nan("");
}
