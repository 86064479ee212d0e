"""arcface_torch's train_v2.py, switched from PartialFC_V2 to DCQ, runnable anywhere.

The structure and the variable names follow insightface's
recognition/arcface_torch/train_v2.py at commit
7fadd420c2351d0ffa8cac403421c1a3ed733365 (master), so that this file can be
read side by side with it; ``train_v2_dcq.patch`` in this folder is the same
change as a patch of the real files. Every line that differs because of DCQ is
marked ``# DCQ``.

Replaced by small stand-ins, to run anywhere (seconds on a CPU):
``get_config`` (command-line options instead of a config file), ``get_model``
(a small CNN shaped like iresnet's head), ``get_dataloader`` (synthetic
identities, or a real ``.rec`` with ``--rec``), ``CombinedMarginLoss`` (only its
attributes: DCQLoss reads them and never calls it), ``PolynomialLRWarmup``, and
the logging / verification callbacks. One process (no torch.distributed, so
``shuffled_forward`` is the plain forward).

    python examples/arcface_torch/train_dcq.py                          # synthetic identities
    python examples/arcface_torch/train_dcq.py --num-epoch 6 --resume   # continue from the checkpoint
    python examples/arcface_torch/train_dcq.py --rec data/ --num-classes 1000   # data/train.rec + train.idx
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from dcq_ops import DCQLoss, MomentumEncoder, shuffled_forward  # DCQ (was: from partial_fc_v2 import PartialFC_V2)
from dcq_ops.training import RecordIOImages, TensorImages, TwoViewDataset  # DCQ: two-view data
from dcq_ops.training.data import FlipShift


# ---------------------------------------------------------------------------
# Stand-ins for arcface_torch's modules (configs/, backbones/, dataset.py,
# losses.py, lr_scheduler.py, utils/). Not part of the migration.
# ---------------------------------------------------------------------------

def get_config(args) -> SimpleNamespace:
    """The fields of arcface_torch's configs/base.py that train_v2.py reads."""
    return SimpleNamespace(
        margin_list=tuple(args.margin_list), network="tiny_cnn", resume=args.resume, save_all_states=True,
        output=args.output, embedding_size=args.embedding_size,
        # DCQ: the queue holds ceil(sample_rate * num_classes) class weights (the paper: 10%).
        sample_rate=args.sample_rate, interclass_filtering_threshold=args.interclass_filtering_threshold,
        fp16=args.fp16, batch_size=args.batch_size, optimizer="sgd", lr=args.lr, momentum=0.9,
        weight_decay=5e-4, verbose=10 ** 9, frequent=args.frequent, dali=False, dali_aug=False, gradient_acc=1,
        seed=2048, num_workers=0, rec=args.rec or "synthetic", num_classes=args.num_classes,
        num_image=None, num_epoch=args.num_epoch, warmup_epoch=0, val_targets=[],
        dcq_momentum=args.dcq_momentum,  # DCQ: the weight generator's EMA momentum (configs/base.py in the patch)
        images_per_class=args.images_per_class, device=args.device, image_size=16,
    )


class TinyFaceNet(nn.Module):
    """A small CNN with iresnet's interface: ``fp16`` runs the trunk under autocast,
    the embedding head (fc + BatchNorm1d) in fp32, so embeddings come out fp32."""

    def __init__(self, num_features: int = 64, fp16: bool = False):
        super().__init__()
        self.fp16 = fp16

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout)]

        self.body = nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 32, 2))
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, num_features)
        self.features = nn.BatchNorm1d(num_features)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x):
        amp_dtype = torch.float16 if x.is_cuda else torch.bfloat16
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=self.fp16):
            x = self.bn2(self.body(x))
            x = torch.flatten(x, 1)
        x = self.fc(x.float() if self.fp16 else x)
        return self.features(x)


def get_model(name, dropout=0.0, fp16=False, num_features=512):
    if name != "tiny_cnn":
        raise ValueError(f"this example has one backbone, 'tiny_cnn', got {name!r}")
    return TinyFaceNet(num_features, fp16)


def synthetic_faces(num_identities: int, images_per_identity: int, size: int, seed: int):
    """Images [I*P, 3, size, size] and labels: each identity is a smooth random
    'face' (low-frequency pattern); each of its images adds lighting, a shift
    and pixel noise. Every identity has its own label: a data set where every
    sample has the same label (arcface_torch's SyntheticDataset) gives DCQ a
    loss of exactly 0, since every queue entry is then the sample's own class."""
    g = torch.Generator().manual_seed(seed)
    faces = F.interpolate(torch.randn(num_identities, 3, 4, 4, generator=g), size=size, mode="bilinear",
                          align_corners=False)
    faces = faces + 0.3 * F.interpolate(torch.randn(num_identities, 3, 8, 8, generator=g), size=size,
                                        mode="bilinear", align_corners=False)
    labels = torch.arange(num_identities).repeat_interleave(images_per_identity)
    images = faces[labels]
    images = images * (1 + 0.2 * torch.randn(len(labels), 1, 1, 1, generator=g))  # lighting
    shifts = torch.randint(-1, 2, (len(labels), 2), generator=g)
    images = torch.stack([torch.roll(im, (int(dy), int(dx)), (1, 2)) for im, (dy, dx) in zip(images, shifts)])
    images = images + 0.8 * torch.randn(images.shape, generator=g)
    return images, labels


def get_dataloader(cfg, root_dir, local_rank, batch_size, seed, num_workers, num_classes):
    """DCQ: items (image, another image of the same identity, label), the second
    for the weight generator; each view gets a random flip (arcface_torch's
    augmentation). A ``.rec`` is read by dcq_ops (no mxnet), as in the patch."""
    if root_dir == "synthetic":
        images, labels = synthetic_faces(num_classes, cfg.images_per_class, cfg.image_size, seed)
        source = TensorImages(images, labels)
    else:
        source = RecordIOImages(root_dir, image_size=cfg.image_size)
    train_set = TwoViewDataset(source, seed=seed, augment=FlipShift(0.5, max_shift=0))
    sampler = DistributedSampler(train_set, num_replicas=1, rank=local_rank, shuffle=True, seed=seed)
    return DataLoader(train_set, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True)


class CombinedMarginLoss(nn.Module):
    """Stand-in for arcface_torch's losses.CombinedMarginLoss: the same constructor
    and attributes. DCQLoss reads s, m1, m2, m3 and interclass_filtering_threshold
    and applies the margin inside its fused kernel; it never calls this object."""

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def forward(self, logits, labels):
        raise RuntimeError("only PartialFC_V2 calls the margin loss on materialised logits")


def PolynomialLRWarmup(optimizer, warmup_iters, total_iters, power=1.0, last_epoch=-1):
    """Linear warm-up, then lr * (1 - progress) ** power to 0 at ``total_iters``,
    as arcface_torch's lr_scheduler.PolynomialLRWarmup."""
    def factor(step):
        if step < warmup_iters:
            return (step + 1) / warmup_iters
        return max(0.0, 1 - (step - warmup_iters) / max(1, total_iters - warmup_iters)) ** power
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=last_epoch)


class AverageMeter:
    """utils.utils_logging.AverageMeter."""

    def __init__(self):
        self.val = self.avg = self.sum = self.count = 0

    def update(self, val, n=1):
        self.val, self.sum, self.count = val, self.sum + val * n, self.count + n
        self.avg = self.sum / self.count

    def reset(self):
        self.__init__()


class CallBackLogging:
    """utils.utils_callbacks.CallBackLogging: every ``frequent`` steps, the speed,
    the mean loss since the last line, the learning rate, the epoch, the step."""

    def __init__(self, frequent, total_step, batch_size, start_step=0):
        self.frequent, self.total_step, self.batch_size = frequent, total_step, batch_size
        self.tic = time.time()

    def __call__(self, global_step, loss, epoch, fp16, learning_rate, grad_scaler):
        if global_step > 0 and global_step % self.frequent == 0:
            speed = self.frequent * self.batch_size / max(time.time() - self.tic, 1e-9)
            scale = f"   Fp16 Grad Scale: {grad_scaler.get_scale():.0f}" if fp16 else ""
            logging.info(f"Speed {speed:.2f} samples/sec   Loss {loss.avg:.4f}   LearningRate {learning_rate:.6f}   "
                         f"Epoch: {epoch}   Global Step: {global_step}{scale}")
            loss.reset()
            self.tic = time.time()


@torch.no_grad()
def verification_accuracy(backbone, cfg, num_identities=100) -> float:
    """Same/different-identity accuracy (best threshold) on unseen synthetic
    identities, 2 images each: the stand-in for CallBackVerification."""
    was_training = backbone.training
    backbone.eval()
    images, labels = synthetic_faces(num_identities, 2, cfg.image_size, seed=cfg.seed + 1)
    emb = F.normalize(backbone(images.to(cfg.device)).float(), dim=1).cpu()
    backbone.train(was_training)
    a, b = emb[0::2], emb[1::2]
    positive = (a * b).sum(1)
    negative = (a * b.roll(1, 0)).sum(1)
    scores = torch.cat([positive, negative])
    truth = torch.cat([torch.ones_like(positive), torch.zeros_like(negative)]).bool()
    return max(((scores > t) == truth).float().mean().item() for t in scores)


# ---------------------------------------------------------------------------
# main: train_v2.py's main(), with the DCQ lines marked.
# ---------------------------------------------------------------------------

def main(args):
    cfg = get_config(args)
    torch.manual_seed(cfg.seed)
    rank, world_size, local_rank = 0, 1, 0
    os.makedirs(cfg.output, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)

    train_loader = get_dataloader(
        cfg,
        cfg.rec,
        local_rank,
        cfg.batch_size,
        cfg.seed,
        cfg.num_workers,
        num_classes=cfg.num_classes,  # DCQ: the synthetic set draws its labels from it
    )
    cfg.num_image = len(train_loader.dataset)

    backbone = get_model(cfg.network, dropout=0.0, fp16=cfg.fp16, num_features=cfg.embedding_size).to(cfg.device)
    backbone.train()
    weight_generator = MomentumEncoder(backbone, momentum=cfg.dcq_momentum)  # DCQ

    margin_loss = CombinedMarginLoss(
        64,
        cfg.margin_list[0],
        cfg.margin_list[1],
        cfg.margin_list[2],
        cfg.interclass_filtering_threshold
    )

    module_partial_fc = DCQLoss(  # DCQ (was: PartialFC_V2, same arguments)
        margin_loss, cfg.embedding_size, cfg.num_classes,
        cfg.sample_rate, False)
    module_partial_fc.train().to(cfg.device)
    # DCQLoss has no parameters: its group is empty, kept to match train_v2.py.
    opt = torch.optim.SGD(
        params=[{"params": backbone.parameters()}, {"params": module_partial_fc.parameters()}],
        lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)

    cfg.total_batch_size = cfg.batch_size * world_size
    cfg.warmup_step = cfg.num_image // cfg.total_batch_size * cfg.warmup_epoch
    cfg.total_step = cfg.num_image // cfg.total_batch_size * cfg.num_epoch

    lr_scheduler = PolynomialLRWarmup(
        optimizer=opt,
        warmup_iters=cfg.warmup_step,
        total_iters=cfg.total_step)

    start_epoch = 0
    global_step = 0
    if cfg.resume:
        dict_checkpoint = torch.load(os.path.join(cfg.output, f"checkpoint_gpu_{rank}.pt"), map_location=cfg.device)
        start_epoch = dict_checkpoint["epoch"]
        global_step = dict_checkpoint["global_step"]
        backbone.load_state_dict(dict_checkpoint["state_dict_backbone"])
        module_partial_fc.load_state_dict(dict_checkpoint["state_dict_softmax_fc"])  # DCQ: the queue
        weight_generator.load_state_dict(dict_checkpoint["state_dict_weight_generator"])  # DCQ
        opt.load_state_dict(dict_checkpoint["state_optimizer"])
        lr_scheduler.load_state_dict(dict_checkpoint["state_lr_scheduler"])
        del dict_checkpoint

    for key, value in sorted(vars(cfg).items()):
        num_space = 25 - len(key)
        logging.info(": " + key + " " * num_space + str(value))
    logging.info(f"queue: {module_partial_fc.queue_size} slots for {cfg.num_classes} classes; "
                 f"backend {module_partial_fc.resolved_backend}")
    logging.info(f"verification accuracy before training: {verification_accuracy(backbone, cfg):.3f}")

    callback_logging = CallBackLogging(
        frequent=cfg.frequent,
        total_step=cfg.total_step,
        batch_size=cfg.batch_size,
        start_step=global_step,
    )

    loss_am = AverageMeter()
    amp = torch.amp.GradScaler(torch.device(cfg.device).type, growth_interval=100)

    for epoch in range(start_epoch, cfg.num_epoch):

        if isinstance(train_loader, DataLoader):
            train_loader.sampler.set_epoch(epoch)
            if hasattr(train_loader.dataset, "set_epoch"):  # DCQ: new partner images and flips each epoch
                train_loader.dataset.set_epoch(epoch)
        for _, (img, img_b, local_labels) in enumerate(train_loader):  # DCQ: two images per sample
            img, img_b, local_labels = img.to(cfg.device), img_b.to(cfg.device), local_labels.to(cfg.device)
            global_step += 1
            local_embeddings = backbone(img)
            # DCQ: shuffle-BN across ranks, its permutation a function of (seed, step)
            class_weights = shuffled_forward(weight_generator, img_b, seed=cfg.seed, step=global_step)
            loss: torch.Tensor = module_partial_fc(local_embeddings, local_labels, class_weights)  # DCQ

            if cfg.fp16:
                amp.scale(loss).backward()
                if global_step % cfg.gradient_acc == 0:
                    amp.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
                    amp.step(opt)
                    amp.update()
                    opt.zero_grad()
                    weight_generator.update()  # DCQ
            else:
                loss.backward()
                if global_step % cfg.gradient_acc == 0:
                    torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
                    opt.step()
                    opt.zero_grad()
                    weight_generator.update()  # DCQ
            lr_scheduler.step()

            with torch.no_grad():
                loss_am.update(loss.item(), 1)
                callback_logging(global_step, loss_am, epoch, cfg.fp16, lr_scheduler.get_last_lr()[0], amp)

        if cfg.save_all_states:
            checkpoint = {
                "epoch": epoch + 1,
                "global_step": global_step,
                "state_dict_backbone": backbone.state_dict(),
                # DCQ: the queue as one global FIFO, which loads in any mode on any number of ranks
                "state_dict_softmax_fc": module_partial_fc.global_state_dict(),
                "state_dict_weight_generator": weight_generator.state_dict(),  # DCQ
                "state_optimizer": opt.state_dict(),
                "state_lr_scheduler": lr_scheduler.state_dict()
            }
            torch.save(checkpoint, os.path.join(cfg.output, f"checkpoint_gpu_{rank}.pt"))

        if rank == 0:
            path_module = os.path.join(cfg.output, "model.pt")
            torch.save(backbone.state_dict(), path_module)

    logging.info(f"verification accuracy after training: {verification_accuracy(backbone, cfg):.3f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="arcface_torch train_v2.py with DCQ, on synthetic data or a .rec")
    parser.add_argument("--rec", default=None,
                        help="a .rec, or a folder with train.rec + train.idx (resized to 16x16); default: synthetic")
    parser.add_argument("--num-classes", type=int, default=1000, help="identities (with --rec: of the .rec)")
    parser.add_argument("--images-per-class", type=int, default=2, help="synthetic set only")
    parser.add_argument("--embedding-size", type=int, default=64)
    parser.add_argument("--sample-rate", type=float, default=0.1, help="queue size = ceil(rate * num_classes)")
    parser.add_argument("--margin-list", type=float, nargs=3, default=(1.0, 0.0, 0.3),
                        metavar=("M1", "M2", "M3"), help="arcface_torch's margin_list (default CosFace 0.3)")
    parser.add_argument("--interclass-filtering-threshold", type=float, default=0.0)
    parser.add_argument("--dcq-momentum", type=float, default=0.99,
                        help="weight generator EMA momentum: time constant 1/(1-m) steps; 0.999 suits long runs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-epoch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--fp16", action="store_true", help="autocast in the backbone + GradScaler")
    parser.add_argument("--frequent", type=int, default=20)
    parser.add_argument("--output", default="work_dirs/dcq_synthetic")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    main(parse_args())
