"""The book's Triton kernels, apart from the model code that calls them.

Each module holds ``@triton.jit`` kernels, their autotuning configurations, and the thin launchers
and ``torch.library`` custom ops around them. The modules the notebooks import (``labutils.gemv``,
``labutils.quant``, ...) re-export every name that moved here, so ``labutils.quant._w4_gemv_kernel``
and ``labutils.kernels.quant._w4_gemv_kernel`` are one object. Nothing is imported here: a module's
kernels and custom ops are defined (once) when that module is first imported.

Map: module -- kernels; launchers and custom ops -- the model code that calls them.

- ``flash_attention`` -- ``_attn_inner`` / ``_attn_fwd`` (pointer loads: any GPU, the interpreter),
  ``_attn_inner_tma`` / ``_attn_fwd_tma`` (tensor descriptors, sm_90+); ``flash_attention``,
  ``tma_usable`` -- ``labutils.flash_attention.flash_backend`` (the attention backend "flash",
  custom op ``labutils::flash_attention_backend``), notebook 03.
- ``decode_attention`` -- ``_decode_split`` (FlashDecoding: partial outputs of split key ranges),
  ``_decode_combine`` (their exact merge); ``flash_decode``, ``default_num_splits`` --
  ``flash_backend`` for one new token; ``kernels.paged_attention`` uses the merge and the split count;
  ``_decode_rows_split``, ``flash_decode_rows`` -- the same for a few queries per sequence (query
  heads x tokens as rows, each at its own position): ``flash_backend`` for 2-32 new tokens.
- ``gemv`` -- ``_gemv_kernel`` (one row), ``_small_m_kernel`` and ``_split_k_sum_kernel`` (2-16 rows on
  the tensor cores, optional split-K); ``gemv_triton``, ``small_m_triton``, custom ops
  ``labutils::linear_gemv`` and ``labutils::linear_small_m`` -- ``labutils.gemv.GemvLinear`` and
  ``SmallMLinear`` (notebooks 02 and 05).
- ``quant`` -- W8A16 / W4A16 / NF4: ``_w8_gemv_kernel`` / ``_w4_gemv_kernel`` (one row, codes as int32
  words), ``_w4_mma_kernel`` (2-16 rows, words, tensor cores), ``_w8a16_kernel`` / ``_w4a16_kernel``
  (byte tiles, other K); ``_launch``, custom ops ``labutils::w8a16_linear`` and
  ``labutils::w4a16_linear`` -- ``labutils.quant.Int8Linear``, ``Int4Linear``, ``NF4Linear``
  (notebook 04); the formats they read come from ``labutils.quant_formats``.
- ``actquant`` -- ``_quant_rows_kernel`` (int8 / e4m3 codes with one scale per row), ``_w8a8_kernel``
  (int8 GEMM, both scales in the epilogue); ``quant_rows``, ``w8a8_matmul`` --
  ``labutils.actquant.w8a8_linear`` and ``fp8_linear`` (notebook 04, section 6).
- ``paged_attention`` -- ``_paged_decode_split`` (decode over a block pool), ``_paged_prefill`` (varlen
  causal prefill over pages); ``paged_decode``, ``paged_prefill_triton``, custom ops
  ``labutils::paged_decode`` and ``labutils::paged_prefill`` --
  ``labutils.paged_attention.PagedKVCache`` (notebook 06, ``labutils.scheduler``).
- ``int4_fast`` -- INT4 / INT8 weight-only kernels for 1-16 rows on an offline re-layout of the
  codes (custom ops ``labutils::int4_fast_linear`` and ``labutils::int8_fast_linear``); see that
  module's docstring.

Outside this package: the quantization formats and quantizers (``labutils.quant_formats``),
activation-aware scaling (``labutils.awq``), the ``nn.Linear`` modules (``labutils.gemv``,
``labutils.quant``), the attention backends (``labutils.attention``,
``labutils.flash_attention.flash_backend``) and the paged cache seam (``labutils.paged_attention``).
"""
