"""A model's quantized matrices in one block of memory backed by huge pages (Linux).

Decode reads every weight once per token. In 4 KB pages a 1 GB model is 260k pages: a TLB miss
each, and the hardware prefetchers stop at every page boundary. In 2 MB pages neither cost is paid.
Measured on Qwen2.5-Coder-1.5B, sugam's AVX2 path on a 2-core Zen 4: 14.8 -> 16.1 tok/s with half of the
weights in huge pages (PyTorch's THP_MEM_ALLOC_ENABLE); this module puts all of them there.

Linux's transparent huge pages are usually in "madvise" mode: a region gets them when it is advised
(MADV_HUGEPAGE) before it is written, which is what happens here. Elsewhere, or with THP off, the
block is ordinary memory and nothing else changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_ALIGN = 64  # every matrix starts on a cache line (and on its element size)
_TRIM_EVERY = 64 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> None:
    """Hand heap memory freed so far back to the OS (glibc keeps freed pages for reuse, so RSS would
    stay hundreds of MB above what the model uses). No-op where there is no glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _advise_huge_pages(t: torch.Tensor) -> bool:
    libc = _libc()
    if platform.system() != "Linux" or libc is None or not hasattr(libc, "madvise"):
        return False
    return libc.madvise(ctypes.c_void_p(t.data_ptr()), ctypes.c_size_t(t.numel()), _MADV_HUGEPAGE) == 0


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """nbytes of uint8 CPU memory starting on a 2 MB boundary, advised for huge pages before any write."""
    raw = torch.empty(nbytes + 2 * HUGE_PAGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % HUGE_PAGE
    span = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    block = raw[start:start + span]
    _advise_huge_pages(block)
    return block[:nbytes]


def gather_quantized_weights(model: nn.Module, module_type: type[nn.Module]) -> int:
    """Move the CPU buffers of every `module_type` module (the quantized matrices) into one huge-page
    block, module by module (each original is freed as its copy lands). Returns the bytes moved."""
    entries = [(m, name, buf.numel() * buf.element_size()) for m in model.modules() if isinstance(m, module_type)
               for name, buf in m.named_buffers(recurse=False) if buf is not None and buf.is_cpu and buf.is_contiguous()]
    total = sum(-(-n // _ALIGN) * _ALIGN for _, _, n in entries)
    if total < HUGE_PAGE:
        return 0
    block = huge_page_buffer(total)
    offset = freed = 0
    for module, name, n in entries:  # no list holds the originals: each is freed once replaced
        buf = getattr(module, name)
        view = block[offset:offset + n].view(buf.dtype).view(buf.shape)
        view.copy_(buf)
        module.register_buffer(name, view)
        del buf
        offset += -(-n // _ALIGN) * _ALIGN
        freed += n
        if freed >= _TRIM_EVERY:  # glibc keeps freed heap pages: hand them back as we go, or the
            return_freed_memory()  # copy would briefly need twice the weights' memory
            freed = 0
    return_freed_memory()
    log.debug("quantized weights: %d MB in one huge-page block", total >> 20)
    return total
