"""dcq_ops: fused kernels for face-recognition training with a Dynamic Class Queue.

The library (what a trainer imports): ``dcq_cross_entropy``, ``DCQLoss``,
``ClassQueue``, ``MomentumEncoder``, margins, backend selection, ``warmup`` (compile,
autotune and check the fused kernels before training: dcq_ops.first_contact), and the
multi-rank queue strategies (``dcq_ops.parallel``). The loss is defined in
docs/loss.md.

The training application (backbones, data, heads, verification, the loop) is
the subpackage ``dcq_ops.training``: import its names from there. (They are still
reachable from here for one release, with a DeprecationWarning, loaded on first use,
so ``import dcq_ops`` never imports the application.) docs/api.md is the reference.
"""

import warnings as _warnings


from dcq_ops._extension import (EXTENSION_ERROR, cpu_capability, cpu_gemm_probe, cpu_gemm_provider,
                                cpu_gemm_providers, extension_loaded, has_cuda_kernels, set_cpu_gemm_provider)
from dcq_ops.backends import backends, select_backend
from dcq_ops.warmup import warmup
from dcq_ops.functional import dcq_cross_entropy
from dcq_ops.loss import DCQLoss
from dcq_ops.margin import MarginConfig, margin_from
from dcq_ops.momentum import MomentumEncoder
from dcq_ops.parallel import DistributedInputError, ShardedClassQueue, shuffled_forward
from dcq_ops.queue import ClassQueue

__version__ = "0.1.0"

# Deprecated aliases of the training application's names (dcq_ops.training), imported on first use.
_TRAINING = ("DCQHead", "FullSoftmaxHead", "IResNet", "ImageFolder", "PartialFCHead", "SmallCNN",
             "SyntheticConfig", "TensorImages", "TrainConfig", "Trainer", "TwoViewBatchSampler", "TwoViewDataset",
             "RecordIOImages", "pack_folder", "build_backbone", "build_head", "evaluate_bin", "kfold_accuracy",
             "load_bin", "make_synthetic", "tar_at_far")


def __getattr__(name):
    if name in _TRAINING:
        _warnings.warn(f"dcq_ops.{name} is deprecated: import it from dcq_ops.training (the root namespace is the "
                       "library only)", DeprecationWarning, stacklevel=2)
        from dcq_ops import training
        return getattr(training, name)
    raise AttributeError(f"module 'dcq_ops' has no attribute {name!r}")


__all__ = [
    "ClassQueue",
    "DCQLoss",
    "DistributedInputError",
    "EXTENSION_ERROR",
    "MarginConfig",
    "MomentumEncoder",
    "ShardedClassQueue",
    "backends",
    "cpu_capability",
    "cpu_gemm_probe",
    "cpu_gemm_provider",
    "cpu_gemm_providers",
    "set_cpu_gemm_provider",
    "dcq_cross_entropy",
    "extension_loaded",
    "has_cuda_kernels",
    "margin_from",
    "select_backend",
    "shuffled_forward",
    "warmup",
]
