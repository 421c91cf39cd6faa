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
    row_sq[:] = 0.0  # (an empty matrix's rows and columns sum to 0; it has no blocks)
    col_sq[:] = 0.0
    if parallel:
        for k in prange(blocks.shape[0]):
            _block_sums(grads, fmt, factor, segments, layout, blocks, row_sq, col_partial, k)
    else:
        for k in range(blocks.shape[0]):
            _block_sums(grads, fmt, factor, segments, layout, blocks, row_sq, col_partial, k)
    # each matrix's column sums: its blocks' partials in block order (blocks of one matrix
    # are consecutive in the table)
    k = 0
    while k < blocks.shape[0]:
        s = blocks[k, 0]
        rows, cols = segments[s, 2], segments[s, 3]
        matrix = blocks[k, 1] // rows
        out = layout[s, 1] + matrix * cols
        for c in range(cols):
            col_sq[out + c] = 0.0
        while k < blocks.shape[0] and blocks[k, 0] == s and blocks[k, 1] // rows == matrix:
            at = blocks[k, 3]
            for c in range(cols):
                col_sq[out + c] += col_partial[at + c]
            k += 1


@helper
def _block_sums(grads, fmt, factor, segments, layout, blocks, row_sq, col_partial, k):
    s, first, stop, at = blocks[k, 0], blocks[k, 1], blocks[k, 2], blocks[k, 3]
    offset, cols = segments[s, 0], segments[s, 3]
    for c in range(cols):
        col_partial[at + c] = 0.0
    for q in range(first, stop):
        start = offset + q * cols
        total0 = 0.0
        total1 = 0.0
        for c in range(cols):  # (the column partials: independent per c, vectorisable)
            x = factor * np.float64(load_grad(grads, start + c, fmt))
            col_partial[at + c] += x * x
        half = cols // 2
        for c in range(half):  # (the row sum: two lanes in a fixed order)
            x0 = factor * np.float64(load_grad(grads, start + 2 * c, fmt))
            x1 = factor * np.float64(load_grad(grads, start + 2 * c + 1, fmt))
            total0 += x0 * x0
            total1 += x1 * x1
        if cols % 2:
            x0 = factor * np.float64(load_grad(grads, start + cols - 1, fmt))
            total0 += x0 * x0
        row_sq[layout[s, 0] + q] = total0 + total1
