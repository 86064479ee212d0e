"""The set-up of benchmarks/throughput.py: the models, optimizer and inputs of one row
(``Step``), the bytes they hold between steps, and the estimate of a row's peak memory
that decides whether a CPU row is started at all. throughput.py holds the sweep."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from dcq_ops import MomentumEncoder
from dcq_ops.training.backbones import build_backbone
from dcq_ops.training.heads import build_head

from common import DTYPES

HEADS = ("softmax", "partial_fc", "dcq")
REFERENCES = ("backbone", "backbone_gen")  # no head: independent of the number of classes
METHODS = REFERENCES + HEADS


def estimate_peak_bytes(method: str, classes: int, args) -> int:
    """A deliberately generous estimate of a row's peak memory, for refusing on the CPU
    what cannot fit. Per-class tensors of the softmax and Partial FC: the weights, their
    gradient, the momentum, the weight-decay temporary of SGD and the normalised copy
    (about 5-6 copies of [C, D] fp32), plus the logits and their temporaries ([N, C] a
    few times). DCQ holds the queue [K, D] and the labels only."""
    d, n = args.embedding_size, args.batch_size
    sampled = math.ceil(args.sample_rate * classes)
    if method == "softmax":
        return 6 * classes * d * 4 + 6 * n * classes * 4
    if method == "partial_fc":
        return 6 * classes * d * 4 + 3 * sampled * d * 4 + 6 * n * sampled * 4 + 2 * classes * 4
    if method == "dcq":
        return sampled * (d * 4 + 8) + 4 * n * min(sampled, 1 << 16) * 4
    return 0


def state_bytes(*objects) -> int:
    """Bytes of the parameters and buffers of modules and the state of optimizers."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for obj in objects:
        if obj is None:
            continue
        if isinstance(obj, nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                add(t)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for t in state.values():
                    add(t)
    return total


class Step:
    """The models, optimizer and fixed random inputs of one row; ``step()`` runs one
    training step (no synchronisation inside)."""

    def __init__(self, method: str, classes: int | None, args, device: torch.device):
        self.method, self.args, self.device = method, args, device
        dtype = DTYPES[args.dtype]
        self.autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
        n, d = args.batch_size, args.embedding_size
        with torch.device(device):  # build in place: no [C, D] copy through host memory
            self.backbone = None
            if args.mode == "end2end":
                self.backbone = build_backbone(args.backbone, embedding_size=d, image_size=args.image_size).train()
            self.head = None
            if method in HEADS:
                kwargs = {}
                if method == "dcq":
                    kwargs = dict(fp16=dtype != torch.float32, backend=args.dcq_backend)
                self.head = build_head(method, classes, d, sample_rate=args.sample_rate, **kwargs).train()
            self.generator = None
            if method in ("dcq", "backbone_gen") and self.backbone is not None:
                self.generator = MomentumEncoder(self.backbone, momentum=0.999)
            params = []
            if self.backbone is not None:
                params += list(self.backbone.parameters())
            if self.head is not None:
                params += list(self.head.parameters())
            self.optimizer = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
                              if params else None)
            self.scaler = (torch.amp.GradScaler(device.type)
                           if dtype == torch.float16 and device.type == "cuda" and self.optimizer else None)
            gen = torch.Generator(device=device).manual_seed(0)
            self.labels = torch.randint(0, classes or 1, (n,), generator=gen, device=device)
            if self.backbone is not None:
                shape = (n, 3, args.image_size, args.image_size)
                self.view_a = torch.randn(shape, generator=gen, device=device)
                self.view_b = torch.randn(shape, generator=gen, device=device) if self.generator else None
            else:  # loss only: the embeddings are the leaf that receives the gradient
                emb_dtype = dtype
                self.embeddings = torch.randn(n, d, generator=gen, device=device, dtype=emb_dtype).requires_grad_()
                self.class_weights = (torch.randn(n, d, generator=gen, device=device, dtype=emb_dtype)
                                      if method == "dcq" else None)

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if self.backbone is None:
            self.embeddings.grad = None
            loss = self.head(self.embeddings, self.labels, self.class_weights)
        else:
            with self.autocast:
                embeddings = self.backbone(self.view_a)
                class_weights = self.generator(self.view_b) if self.generator is not None else None
                if self.head is None:  # a reference row: a stand-in loss with no per-class cost
                    loss = embeddings.float().square().mean()
                else:
                    loss = self.head(embeddings, self.labels, class_weights)  # DCQ enqueues here
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.backbone is not None:
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), 5)
        if self.optimizer is not None:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        if self.generator is not None:
            self.generator.update()

    def state(self) -> int:
        return state_bytes(self.backbone, self.head, self.generator, self.optimizer)
