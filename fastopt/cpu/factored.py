"""Factored statistics over a segment table: the sums of g^2 along each row and each column
of every tensor of 2 or more dims (Adafactor's second-moment factors; driver code, shared by
any optimizer with factored moments, not generated per optimizer).

A tensor of shape (..., r, c) is batch matrices of r x c; its row sums go to
``row_sq[row_at + q]`` (q = matrix * r + row) and its column sums to
``col_sq[col_at + matrix * c + col]``, where (row_at, col_at) is the tensor's row of
``SegmentTable.factored_layout()``'s offsets: the layout of the packed ``row_var`` and
``col_var`` state (every value of both is written: an empty matrix's are 0). Tensors of
fewer dims are not read. Everything is summed in float64 in a
fixed order (each block's rows in order into its own column partial, the blocks of a matrix
in block order), so the result does not depend on the thread count.
"""

import numpy as np
from numba import prange

from ._jit import helper, kernel
from .access import load_grad


@kernel
def factored_square_sums(grads, fmt, grad_factor, segments, layout, blocks, row_sq,
                         col_partial, col_sq, parallel):
    """Row and column sums of (grad_factor g)^2 for the blocks of ``SegmentTable.row_blocks``
    (``col_partial``: the table's partial buffer)."""
    factor = np.float64(grad_factor)
    # (an empty matrix's rows and columns sum to 0; it has no blocks. Loops, not slice
    # assignments: under parallel=True Numba makes an array expression a parallel loop
    # whatever ``parallel`` says, which kills a child forked from a GNU OpenMP parent)
    for r in range(row_sq.shape[0]):
        row_sq[r] = 0.0
    for c in range(col_sq.shape[0]):
        col_sq[c] = 0.0
    if parallel:
        for k in prange(blocks.shape[0]):
            _block_sums(grads, fmt, factor, segments, layout, blocks, row_sq, col_partial,
                        col_sq, k)
    else:
        for k in range(blocks.shape[0]):
            _block_sums(grads, fmt, factor, segments, layout, blocks, row_sq, col_partial,
                        col_sq, k)
    # a split matrix's column sums: its blocks' partials in block order (consecutive in the
    # table); whole-matrix blocks wrote theirs directly
    for k in range(blocks.shape[0]):
        at = blocks[k, 3]
        if at < 0:
            continue
        s = blocks[k, 0]
        rows, cols = segments[s, 2], segments[s, 3]
        out = layout[s, 1] + (blocks[k, 1] // rows) * cols
        for c in range(cols):
            col_sq[out + c] += col_partial[at + c]


@helper
def _row_sum(grads, fmt, factor, first, count, into, into_first):
    """Row [first, first + count)'s sum of squares (four lanes in a fixed order); each square
    also added to ``into[into_first + c]`` (the column sums). Unsigned indices: a signed
    one's wrap-around check keeps LLVM from vectorising the loops."""
    start, cols, at = np.uint64(first), np.uint64(count), np.uint64(into_first)
    for c in range(np.uint64(0), cols):  # (independent per c: vectorisable)
        x = factor * np.float64(load_grad(grads, start + c, fmt))
        into[at + c] += x * x
    lane0 = 0.0
    lane1 = 0.0
    lane2 = 0.0
    lane3 = 0.0
    full = cols // np.uint64(4) * np.uint64(4)
    for c in range(np.uint64(0), full, np.uint64(4)):
        x0 = factor * np.float64(load_grad(grads, start + c, fmt))
        x1 = factor * np.float64(load_grad(grads, start + c + np.uint64(1), fmt))
        x2 = factor * np.float64(load_grad(grads, start + c + np.uint64(2), fmt))
        x3 = factor * np.float64(load_grad(grads, start + c + np.uint64(3), fmt))
        lane0 += x0 * x0
        lane1 += x1 * x1
        lane2 += x2 * x2
        lane3 += x3 * x3
    for c in range(full, cols):
        x0 = factor * np.float64(load_grad(grads, start + c, fmt))
        lane0 += x0 * x0
    return (lane0 + lane1) + (lane2 + lane3)


@helper
def _block_sums(grads, fmt, factor, segments, layout, blocks, row_sq, col_partial, col_sq,
                k):
    s, first, stop, at = blocks[k, 0], blocks[k, 1], blocks[k, 2], blocks[k, 3]
    offset, rows, cols = segments[s, 0], segments[s, 2], segments[s, 3]
    if at >= 0:  # rows of a split matrix: the columns into the block's partial
        for c in range(cols):
            col_partial[at + c] = 0.0
        for q in range(first, stop):
            row_sq[layout[s, 0] + q] = _row_sum(grads, fmt, factor, offset + q * cols, cols,
                                                col_partial, at)
    else:  # whole matrices: the columns straight into the output
        for q in range(first, stop):
            row_sq[layout[s, 0] + q] = _row_sum(grads, fmt, factor, offset + q * cols, cols,
                                                col_sq, layout[s, 1] + (q // rows) * cols)
