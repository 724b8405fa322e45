"""Attacks as registered units, and the named settings the matrix runs.

Every attack takes ``(model, images, labels, ...)`` with images (N, C, H, W) in [0, 1] and labels
(N,) int64, and returns adversarial images of the same shape, dtype and device, in [0, 1] (a
query attack inside a ``QueryResult``, with its per-image query counts).
Budgets (``eps``, ``step``) are in pixel units of [0, 1]; the named ``SETTINGS`` give them in
/255 units, as the paper does. Models normalise their own inputs, so attacks never think about
normalisation. During an attack the model is in eval mode with its parameters frozen (no weight
gradients are computed); both are restored afterwards.

    setting = get_setting("madry_pgd")          # AttackSetting("madry_pgd", PGD(8, 2, 7))
    adversarial = setting.run(model, images, labels)

Transfer attacks (``gradient.py``: FGSM, PGD, MI-FGSM; ``cw.py``: CW-L2) need the gradients of a
source model; query attacks (``square.py``, ``hopskipjump.py``) only a target's outputs and
return a ``QueryResult`` with exact query counts. Adding an attack: a function and a parameters
class decorated with ``register_method`` (one module), and its named settings in ``settings.py``.
"""
from rm_sweep.attacks.base import (
    METHODS,
    AttackSetting,
    check_batch,
    frozen_eval,
    input_gradient,
    register_method,
    round_to_8bit,
)
from rm_sweep.attacks.cw import CWL2, cw_l2
from rm_sweep.attacks.gradient import FGSM, MIFGSM, PGD, fgsm, mifgsm, pgd
from rm_sweep.attacks.hopskipjump import HopSkipJump, hop_skip_jump
from rm_sweep.attacks.query import CountingModel, QueryResult
from rm_sweep.attacks.settings import PAPER_TABLE_COLUMNS, SETTINGS, get_setting, list_settings
from rm_sweep.attacks.square import Square, square_linf

__all__ = [
    "CWL2",
    "CountingModel",
    "FGSM",
    "HopSkipJump",
    "METHODS",
    "MIFGSM",
    "PAPER_TABLE_COLUMNS",
    "PGD",
    "QueryResult",
    "SETTINGS",
    "Square",
    "AttackSetting",
    "check_batch",
    "cw_l2",
    "fgsm",
    "frozen_eval",
    "get_setting",
    "hop_skip_jump",
    "input_gradient",
    "list_settings",
    "mifgsm",
    "pgd",
    "register_method",
    "round_to_8bit",
    "square_linf",
]
