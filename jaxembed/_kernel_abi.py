"""The CPU kernels' ABI: optimizer kinds and rule flags, written once.

``optimizers.py`` builds each optimizer's ``kernel_rule()`` from these tables, and ``setup.py``
reads this file (without importing jaxembed) to compile ``csrc/cpu_kernels.cc`` with them as
``-DJAXEMBED_KIND_<NAME>=<value>`` and ``-DJAXEMBED_FLAG_<NAME>=<value>``, so the two sides
cannot drift apart. No imports: setup.py runs it in a bare build environment.
"""

KINDS = {
    "SGD": 0,
    "ADAGRAD": 1,
    "ADAGRAD_MOMENTUM": 2,
    "ADAM": 3,
    "FTRL": 4,
    "ROWWISE_ADAGRAD": 5,  # FBGEMM's EXACT_ROWWISE_ADAGRAD: slot 0 is [V]
    "PARTIAL_ROWWISE_ADAM": 6,  # FBGEMM's PARTIAL_ROWWISE_ADAM: slot 1 is [V]
}

FLAGS = {
    "CLIP_GRAD_MIN": 1,
    "CLIP_GRAD_MAX": 2,
    "WEIGHT_DECAY": 4,
    "DECAY_TIMES_LR": 8,
    "CLIP_WEIGHT_MIN": 16,
    "CLIP_WEIGHT_MAX": 32,
    "NESTEROV": 64,  # AdagradMomentum use_nesterov
    "PLAIN_ACCUMULATOR": 128,  # AdagradMomentum with beta2 == 1
    "SUM_INSIDE_SQRT": 256,  # Adam
    "LINEAR_TIMES_LR": 512,  # FTRL multiply_linear_by_learning_rate
    "ROW_DECAY_L2": 1024,  # RowWiseAdagrad weight_decay_mode="l2" (FBGEMM mode 1)
    "ROW_DECAY_DECOUPLED": 2048,  # RowWiseAdagrad weight_decay_mode="decoupled" (mode 2)
}


def compile_definitions() -> list[tuple[str, str]]:
    """The tables as C preprocessor definitions for the kernels' build."""
    kinds = [(f"JAXEMBED_KIND_{name}", str(value)) for name, value in KINDS.items()]
    return kinds + [(f"JAXEMBED_FLAG_{name}", str(value)) for name, value in FLAGS.items()]
