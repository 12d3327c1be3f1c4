"""Where each token of a call goes, on the host: the addressing's arithmetic in torch, for the
argument checks (``arguments.check_contents``) and the float64 reference
(``testing/reference.py``). The kernel does the same on the device, in TensorIR
(``compiler/locate.py``), and shares nothing with this.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Tokens:
    """Where each real token goes, all int64/bool tensors of one element per real token
    (``offsets[-1]``, or ``len(positions)``)."""

    request: torch.Tensor  # (offsets addressing; the token itself by slots)
    pos: torch.Tensor
    page: torch.Tensor  # physical page (-1 where the token has none to look up)
    row: torch.Tensor  # the row in the page
    q_written: torch.Tensor  # the op writes the token's q row
    row_written: torch.Tensor  # the op writes the token's cache row ``(page, row)``

    @property
    def errors(self) -> int:
        """Tokens the op counts as errors: their q row is not written."""
        return int((~self.q_written).sum())


def locate_tokens(input_row_offsets: torch.Tensor, cache_lengths: torch.Tensor,
                  lookup_table: torch.Tensor, max_seq_len: int, num_pages: int,
                  page_size: int) -> Tokens:
    """Request, position and page of every real token, and what the op writes for it."""
    offsets = input_row_offsets.to(torch.int64).cpu()
    counts = offsets[1:] - offsets[:-1]
    request = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    first_token = offsets[:-1][request]
    pos = (cache_lengths.to(torch.int64).cpu()[request] + torch.arange(request.numel())
           - first_token)
    table = lookup_table.to(torch.int64).cpu()
    listed = (pos >= 0) & (pos < max_seq_len) & (pos // page_size < table.shape[1])
    page = torch.full_like(pos, -1)
    page[listed] = table[request[listed], pos[listed] // page_size]
    q_written = listed & (page < num_pages)
    return Tokens(request, pos, page, pos % page_size, q_written, q_written & (page >= 0))


def locate_slots(positions: torch.Tensor, slot_mapping: torch.Tensor, max_seq_len: int,
                 num_pages: int, page_size: int) -> Tokens:
    """Position and page of every token of ``positions``: tokens past ``slot_mapping`` or with
    a negative slot have no cache row; a position without a freqs row or a slot past the
    cache makes an error."""
    pos = positions.to(torch.int64).cpu()
    slot = torch.full_like(pos, -1)
    given = slot_mapping.to(torch.int64).cpu()
    slot[:given.numel()] = given
    q_written = (pos >= 0) & (pos < max_seq_len) & (slot < num_pages * page_size)
    page = torch.where(slot >= 0, slot // page_size, -1)
    return Tokens(torch.arange(pos.numel()), pos, page, slot % page_size, q_written,
                  q_written & (slot >= 0))
