"""The segment table: where each tensor of a flat buffer starts and what shape it has.

Tensor-aware optimizers (LAMB's trust ratio per tensor) reduce over each tensor of a flat
buffer. The kernels get the tensors' layout as two int64 tables, made once per layout and
passed like the schedule table:

- ``rows`` (one row per tensor, ``SEGMENT_COLUMNS``): offset, batch, rows, cols,
  first chunk, end chunk. torch's Adafactor factors the last two dims and keeps the leading
  ones as a batch, so a tensor of shape (..., r, c) has batch = prod(...), rows = r,
  cols = c; a vector of n elements is (1, 1, n) and a scalar (1, 1, 1).
- ``chunks`` (``CHUNK_COLUMNS``): start, stop, segment. Every tensor is cut into chunks of
  at most ``CHUNK`` elements; a chunk never spans two tensors. A parallel pass runs over
  chunks (balanced whatever the tensor sizes), each chunk's partial sums go to its own
  slot, and each tensor's sum adds its chunks' partials in a fixed order (the CPU: chunk
  order; CUDA: each of a block's threads its strided chunks, then the threads in order): the
  result is the same from run to run and, on the CPU, for any thread count, with no
  atomics. (CPU and GPU sums of a tensor of more than 256 chunks differ in the last bits.)

Elements outside every tensor (a FlatBuffer's alignment gaps) are not touched.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

#: elements per chunk: large enough that a chunk's loop runs at full speed, small enough that
#: a model's largest tensor is cut into many (load balance over threads and GPU blocks)
CHUNK = 1 << 15
#: the columns of ``SegmentTable.rows`` and ``SegmentTable.chunks``
SEGMENT_COLUMNS = ("offset", "batch", "rows", "cols", "first_chunk", "end_chunk")
CHUNK_COLUMNS = ("start", "stop", "segment")
#: factored statistics (Adafactor's row and column means of g^2): each matrix of CHUNK or more
#: elements of a tensor of 2 or more dims is cut into at most ROW_BLOCKS blocks of
#: consecutive rows, smaller ones grouped whole; the columns of ``SegmentTable.row_blocks()``
ROW_BLOCKS = 16
ROW_BLOCK_COLUMNS = ("segment", "first_row", "stop_row", "col_partial")
#: the CUDA factored statistics (kernels/factored.cuh; ``SegmentTable.gpu_plan``): a matrix of
#: more than SMALL_MATRIX elements is cut into tiles of up to TILE_COLS columns (a strip, a
#: warp per row) by about TILE_ELEMENTS // min(cols, TILE_COLS) rows, a block each;
#: smaller matrices go GROUP_MATRICES to a block, a thread each. Row means: a thread per matrix
#: of at most MEAN_THREAD_ROWS rows (GROUP_MATRICES to a block), a block per larger one. The
#: columns of the three tables:
TILE_COLS = 256
TILE_ELEMENTS = CHUNK
#: at most this many row tiles a matrix (taller tiles beyond): the fold pass adds a column's
#: row tiles one after another, a tail that would grow with the rows (a 1e6-row embedding:
#: 7 813 tiles of 128 rows). 1024 leaves GPT-2 small's layout as measured (its embedding:
#: 393) and still gives a 1e6 x 256 matrix 1024 blocks; not measured on a card yet
MAX_ROW_TILES = 1024
SMALL_MATRIX = 64
GROUP_MATRICES = 256
MEAN_THREAD_ROWS = 64
FOLD_COLUMNS = ("row_sums_at", "strips", "col_sums_at", "row_tiles")
TILE_COLUMNS = ("segment", "first", "stop", "first_col", "row_tile")
MEAN_COLUMNS = ("segment", "first_matrix", "stop_matrix")


def _factored(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(batch, rows, cols) of a tensor: its last two dims, the leading ones as a batch."""
    if len(shape) == 0:
        return 1, 1, 1
    if len(shape) == 1:
        return 1, 1, shape[0]
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _integer(value, what: str) -> int:
    """An int from an int-like value (numpy integers too); a float, a bool or anything else
    raises TypeError (a truncated dimension would leave elements untouched)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"segments: the {what} must be an integer, got {value!r}")
    return int(value)


def _torch_size(shape: tuple[int, ...]) -> str:
    """A shape as torch prints a tensor's size (its messages quote it)."""
    return f"torch.Size([{', '.join(map(str, shape))}])"


class SegmentTable:
    """The layout of the tensors in a flat buffer of ``size`` elements.

    ``SegmentTable(offsets, shapes, size)``; ``SegmentTable.of(flat)`` for a FlatBuffer.
    Offsets must increase and tensors must not overlap or run past ``size``.
    """

    __slots__ = ("offsets", "shapes", "size", "rows", "chunks", "_device")

    def __init__(self, offsets: Sequence[int], shapes: Sequence[Sequence[int]], size: int):
        shapes = [tuple(_integer(d, f"dimension of tensor {i}") for d in s)
                  for i, s in enumerate(shapes)]
        offsets = [_integer(o, f"offset of tensor {i}") for i, o in enumerate(offsets)]
        if len(offsets) != len(shapes):
            raise ValueError(f"segments: {len(offsets)} offsets for {len(shapes)} shapes")
        if not shapes:
            raise ValueError("segments: at least one tensor is needed")
        end = 0
        for i, (offset, shape) in enumerate(zip(offsets, shapes, strict=True)):
            if any(d < 0 for d in shape):
                raise ValueError(f"segments: tensor {i} has a negative dimension {shape}")
            if offset < end:
                raise ValueError(f"segments: tensor {i} starts at {offset}, inside the one "
                                 f"before it (which ends at {end}); offsets must increase")
            end = offset + math.prod(shape)
            if end > size:
                raise ValueError(f"segments: tensor {i} of shape {shape} at offset {offset} "
                                 f"ends at {end}, past the buffer's {size} elements")
        self.offsets, self.shapes, self.size = offsets, shapes, int(size)
        rows, chunks = [], []
        for index, (offset, shape) in enumerate(zip(offsets, shapes, strict=True)):
            numel = math.prod(shape)
            first = len(chunks)
            for start in range(offset, offset + max(numel, 1), CHUNK):
                # (an empty tensor gets one empty chunk: every tensor has a chunk, and a table
                # at least one, the GPU passes' grid)
                chunks.append((start, min(start + CHUNK, offset + numel), index))
            rows.append((offset, *_factored(shape), first, len(chunks)))
        self.rows = np.array(rows, dtype=np.int64).reshape(-1, len(SEGMENT_COLUMNS))
        self.chunks = np.array(chunks, dtype=np.int64).reshape(-1, len(CHUNK_COLUMNS))
        self._device: dict = {}

    @classmethod
    def of(cls, flat) -> SegmentTable:
        """The table of a ``FlatBuffer``'s views."""
        return cls(flat.offsets, flat.shapes, flat.buffer.shape[0])

    @classmethod
    def contiguous(cls, shapes: Sequence[Sequence[int]]) -> SegmentTable:
        """Tensors of these shapes packed back to back from offset 0, no gaps."""
        sizes = [math.prod(_integer(d, "dimension") for d in s) for s in shapes]
        offsets = np.cumsum([0, *sizes])[:-1]
        return cls(offsets.tolist(), shapes, int(sum(sizes)))

    def factored_layout(self) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Where each tensor's factored second moments go in packed state buffers (the
        layout of Adafactor's state, which ``fastopt.reference.adafactor`` takes too):
        per tensor (row offset, col offset, variance offset), int64, and the buffers'
        sizes (rows, cols, variance). A tensor of 2 or more dims takes batch * rows values
        of the row buffer and batch * cols of the col buffer; any other its numel of the
        variance buffer; each buffer in tensor order."""
        at = [0, 0, 0]
        starts = []
        for shape in self.shapes:
            starts.append(tuple(at))
            batch, rows, cols = _factored(shape)
            if len(shape) >= 2:
                at[0] += batch * rows
                at[1] += batch * cols
            else:
                at[2] += math.prod(shape)
        return np.array(starts, dtype=np.int64).reshape(-1, 3), (at[0], at[1], at[2])

    def row_blocks(self) -> tuple[np.ndarray, int]:
        """The blocks a factored-statistics pass runs over (``ROW_BLOCK_COLUMNS``), for the
        tensors of 2 or more dims, in tensor order: a tensor of shape (..., r, c) is batch * r
        rows of c elements (row q at offset + q * c, matrix q // r). A matrix of at least
        CHUNK elements is cut into min(ROW_BLOCKS, r, ceil(r c / CHUNK)) blocks of nearly
        equal row counts, each writing its column sums to its own c values of a partial
        buffer from ``col_partial`` on (the matrix's columns add its blocks' partials in
        block order, so they are the same at any thread count). Smaller matrices are grouped
        whole, about CHUNK elements a block, ``col_partial`` -1: their column sums are
        written directly. Empty matrices get no block. Returns (the int64 table, the partial
        buffer's size)."""
        blocks, at = [], 0
        for index, shape in enumerate(self.shapes):
            if len(shape) < 2:
                continue
            batch, rows, cols = _factored(shape)
            if rows * cols == 0:
                continue
            if rows * cols < CHUNK:  # whole matrices, grouped
                per = max(1, CHUNK // (rows * cols))
                for b in range(0, batch, per):
                    blocks.append((index, b * rows, min(b + per, batch) * rows, -1))
                continue
            count = max(1, min(ROW_BLOCKS, rows, -(-(rows * cols) // CHUNK)))
            for b in range(batch):
                for k in range(count):
                    first, stop = b * rows + k * rows // count, b * rows + (k + 1) * rows // count
                    blocks.append((index, first, stop, at))
                    at += cols
        return np.array(blocks, dtype=np.int64).reshape(-1, len(ROW_BLOCK_COLUMNS)), at

    def gpu_plan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """The CUDA factored statistics' tables (int64; ``FACTORED_SIGNATURE``'s ``fold``,
        ``tiles`` and ``means``) and the sizes of its two partial buffers.

        ``fold`` (a row per tensor, ``FOLD_COLUMNS``): a tiled matrix's strip sums of row q
        (q = matrix * rows + row) are at ``row_sums_at + q * strips + strip``, its column
        sums of row tile t of matrix b at ``col_sums_at + (b * row_tiles + t) * cols``; 0
        strips and row tiles for the tensors whose sums are written whole (small matrices,
        empty ones, vectors). ``tiles`` (``TILE_COLUMNS``): rows [first, stop) (of one
        matrix) by the TILE_COLS columns from ``first_col``, row tile ``row_tile``; or, with
        ``first_col`` -1, the small matrices [first, stop), a thread each. ``means``
        (``MEAN_COLUMNS``): the matrices [first_matrix, stop_matrix) of a tensor whose rows'
        mean a block computes (one matrix per block above MEAN_THREAD_ROWS rows)."""
        fold, tiles, means = [], [], []
        row_at = col_at = 0
        for index, shape in enumerate(self.shapes):
            batch, rows, cols = _factored(shape)
            if len(shape) < 2 or rows * cols <= SMALL_MATRIX:
                fold.append((0, 0, 0, 0))
                if len(shape) >= 2 and rows * cols:
                    tiles += [(index, b, min(b + GROUP_MATRICES, batch), -1, 0)
                              for b in range(0, batch, GROUP_MATRICES)]
            else:
                strips = -(-cols // TILE_COLS)
                tile_rows = max(1, TILE_ELEMENTS // min(cols, TILE_COLS),
                                -(-rows // MAX_ROW_TILES))
                row_tiles = -(-rows // tile_rows)
                fold.append((row_at, strips, col_at, row_tiles))
                row_at += batch * rows * strips
                col_at += batch * row_tiles * cols
                tiles += [(index, b * rows + t * tile_rows,
                           b * rows + min(rows, (t + 1) * tile_rows), k * TILE_COLS, t)
                          for b in range(batch) for t in range(row_tiles)
                          for k in range(strips)]
            if len(shape) >= 2 and rows:
                if rows <= MEAN_THREAD_ROWS:
                    means += [(index, b, min(b + GROUP_MATRICES, batch))
                              for b in range(0, batch, GROUP_MATRICES)]
                else:
                    means += [(index, b, b + 1) for b in range(batch)]

        def table(entries, columns):
            return np.array(entries, dtype=np.int64).reshape(-1, len(columns))

        return (table(fold, FOLD_COLUMNS), table(tiles, TILE_COLUMNS),
                table(means, MEAN_COLUMNS), row_at, col_at)

    def check_matrices(self, message: str) -> None:
        """ValueError (``message`` with the ``shape``) unless every tensor is 2-D: a matrix
        stage (Muon's) works on matrices only, as torch's does."""
        for shape in self.shapes:
            if len(shape) != 2:
                raise ValueError(message.format(shape=_torch_size(shape)))

    def layout(self) -> dict:
        """The offsets and shapes as plain lists (state dicts and checkpoints keep them)."""
        return {"offsets": list(self.offsets), "shapes": [list(s) for s in self.shapes]}

    def __len__(self) -> int:
        return self.rows.shape[0]

    def numel(self, index: int) -> int:
        return math.prod(self.shapes[index])

    def device(self, xp, device_id: int):
        """(rows, chunks) copied to a GPU once per device."""
        made = self._device.get(device_id)
        if made is None:
            with xp.cuda.Device(device_id):
                made = self._device[device_id] = (xp.asarray(self.rows), xp.asarray(self.chunks))
        return made

    def __eq__(self, other) -> bool:
        return isinstance(other, SegmentTable) and self.size == other.size \
            and self.offsets == other.offsets and self.shapes == other.shapes

    __hash__ = None

    def __repr__(self) -> str:
        return f"SegmentTable({len(self)} tensors, {self.chunks.shape[0]} chunks, size={self.size})"


def segment_table(segments, size: int) -> SegmentTable:
    """A SegmentTable from what a caller gives: a SegmentTable, a FlatBuffer, or a list of
    shapes packed back to back (which must fill ``size`` exactly)."""
    from .flat import FlatBuffer

    if isinstance(segments, SegmentTable):
        table = segments
    elif isinstance(segments, FlatBuffer):
        table = SegmentTable.of(segments)
    elif isinstance(segments, (list, tuple)) and all(
            isinstance(s, (list, tuple)) for s in segments):
        table = SegmentTable.contiguous(segments)
        if table.size != size:
            raise ValueError(f"segments: shapes of {table.size} elements in all for a buffer "
                             f"of {size}")
    else:
        raise TypeError("segments must be a SegmentTable, a FlatBuffer or a list of shapes, "
                        f"got {type(segments).__name__}")
    if table.size != size:
        raise ValueError(f"segments: a table for a buffer of {table.size} elements, the "
                         f"buffer has {size}")
    return table
