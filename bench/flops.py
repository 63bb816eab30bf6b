"""Model FLOPs of a BERT for extractive QA, the GPUs' peaks, and what they make of a measured speed.

Used by ``bench/gpu.py`` (MFU of its speed measurements, the T4 estimate); plain arithmetic, no torch.

**Model FLOPs** (forward and backward, per training window of T real tokens)::

    6 · N · T  +  12 · L · h · T²

N: the non-embedding parameters, i.e. the L encoder layers (attention Q, K, V and output
projections, feed-forward, their biases and LayerNorms) and the QA head; not the word, position and
token-type embedding tables nor their LayerNorm (a lookup, not a matrix product; a
``BertForQuestionAnswering`` has no pooler). 6 = 2 FLOPs per multiply-add × 3 (the backward pass
costs twice the forward). 12 · L · h · T²: the attention scores QKᵀ and their product with V,
2 · T² · h FLOPs each per layer forward, × 3 for forward and backward. Inference (forward only):
``2 · N · T + 4 · L · h · T²``. Padding tokens are not counted: padding is waste, so a lever that
removes padding raises MFU. Not counted either: softmax, GELU and other element-wise work, the
optimizer, recomputation under gradient checkpointing, FGM's second pass.

**MFU** (model FLOPs utilisation) = model FLOPs / (seconds × the chip's dense fp16/bf16 peak).
The peaks are the vendors' dense tensor-core numbers (without 2:4 sparsity), in TFLOP/s:
H100 SXM 989 (datasheet: 1,979 with sparsity), H100 PCIe 756 (1,513), H100 NVL 835 (1,671), H200
989 (1,979), A100 312, L4 121 (242 with sparsity), T4 65 (fp16 mixed precision), V100 125 (SXM2;
PCIe 112) — NVIDIA's product datasheets for each chip. The fp32 rows of a benchmark are measured
against the same 16-bit peak: how far from the chip's best a setting is.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shape:
    """The size of a BERT encoder."""
    layers: int
    hidden: int
    heads: int
    intermediate: int


SHAPES = {"bert-base": Shape(12, 768, 12, 3072),      # bert-base-chinese, hfl/chinese-macbert-base
          "large": Shape(24, 1024, 16, 4096),         # luhua/chinese_pretrain_mrc_macbert_large
          "tiny": Shape(2, 64, 2, 128)}               # hw7qa.tiny's demo model: the CPU smoke run
# the shape of each preset's model_name (random weights of it stand in for the real model)
MODEL_SHAPES = {"bert-base-chinese": "bert-base", "hfl/chinese-macbert-base": "bert-base",
                "luhua/chinese_pretrain_mrc_macbert_large": "large", "hfl/chinese-macbert-large": "large"}

FORMULA = ("MFU = model FLOPs / (seconds × the chip's dense fp16/bf16 peak); model FLOPs per training window of "
           "T real (non-padding) tokens = 6·N·T + 12·L·h·T² (inference: 2·N·T + 4·L·h·T²), N = non-embedding "
           "parameters (encoder layers and QA head; no embedding tables), L layers, h hidden size")
PEAK_SOURCE = "NVIDIA datasheets, dense tensor-core fp16/bf16 TFLOP/s without sparsity (bench/flops.py)"
# (pattern of torch.cuda.get_device_name, dense fp16/bf16 TFLOP/s); the first match wins
PEAKS = ((r"H100.*PCIe", 756.0), (r"H100.*NVL", 835.0), (r"H100", 989.0), (r"H200", 989.0), (r"A100", 312.0),
         (r"\bL4\b", 121.0), (r"\bT4\b", 65.0), (r"V100", 125.0))
T4_PEAK_TFLOPS = 65.0


def peak_tflops(gpu_name: str | None) -> float | None:
    """The dense fp16/bf16 peak of the GPU called ``gpu_name``; None for a CPU or an unknown chip."""
    for pattern, tflops in PEAKS:
        if gpu_name and re.search(pattern, gpu_name):
            return tflops
    return None


def matmul_parameters(shape: Shape) -> int:
    """N: the non-embedding parameters of a ``BertForQuestionAnswering`` of ``shape``: per layer
    Q, K, V, output (4h² + 4h), feed-forward (2hi + i + h), two LayerNorms (4h); the QA head (2h + 2)."""
    h, i = shape.hidden, shape.intermediate
    return shape.layers * (4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h) + 2 * h + 2


def train_flops(shape: Shape, lengths) -> float:
    """Model FLOPs of training on windows of ``lengths`` real tokens: Σ 6·N·T + 12·L·h·T²."""
    t = np.asarray(lengths, dtype=np.float64)
    return float((6 * matmul_parameters(shape) * t + 12 * shape.layers * shape.hidden * t * t).sum())


def forward_flops(shape: Shape, lengths) -> float:
    """Model FLOPs of inference on windows of ``lengths`` real tokens: Σ 2·N·T + 4·L·h·T²."""
    t = np.asarray(lengths, dtype=np.float64)
    return float((2 * matmul_parameters(shape) * t + 4 * shape.layers * shape.hidden * t * t).sum())


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops / (seconds × peak TFLOP/s)``; None without a known peak."""
    if not peak or not seconds or not math.isfinite(seconds):
        return None
    return flops / seconds / (peak * 1e12)


def hours(flops: float, peak: float, utilisation: float | None) -> float | None:
    """Hours to do ``flops`` at ``utilisation`` of ``peak`` TFLOP/s; None without a utilisation."""
    return flops / (peak * 1e12 * utilisation) / 3600 if utilisation else None


def electra_t4_mfu() -> float:
    """MFU of the one measured T4 training speed of a BERT-base-sized model (../shared/docs/anchors.md
    §5, from the transformers ELECTRA docs: electra-base-discriminator, fp16, SDPA, batch 16 × 256
    tokens in 0.2036 s per step, T4, PyTorch 2.5.1), by this module's formula: encoder and a 2-way
    head only, so a lower bound if the measured model also ran its vocabulary projection."""
    return mfu(16 * train_flops(SHAPES["bert-base"], [256]), 0.2036, T4_PEAK_TFLOPS)
