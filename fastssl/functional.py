"""Every loss as a function: ``import fastssl.functional as FS``.

Each function validates its arguments, picks a backend (``backend="auto" | "triton" | "torch" |
"reference"``, env ``FASTSSL_BACKEND``) and returns a 0-d float32 loss. The implementations live
with their family: :mod:`fastssl.ntxent`, :mod:`fastssl.decorrelation`, :mod:`fastssl.swav`,
:mod:`fastssl.dino`, :mod:`fastssl.wmse`, :mod:`fastssl.predictive`, :mod:`fastssl.contrastive`,
:mod:`fastssl.prototype`, :mod:`fastssl.spectral`, :mod:`fastssl.vicregl`, :mod:`fastssl.jepa`.
"""

from fastssl.contrastive import (
    dcl_loss,
    dclw_loss,
    detcon_b_loss,
    detcon_s_loss,
    directclr_loss,
    koleo_loss,
    macl_loss,
    negative_mises_fisher_weights,
    supcon_loss,
)
from fastssl.decorrelation import barlow_twins_loss, vicreg_loss
from fastssl.dino import dino_center_update, dino_loss
from fastssl.ntxent import infonce_loss, ntxent_loss
from fastssl.predictive import byol_loss, center_penalty_loss, negative_cosine_similarity
from fastssl.prototype import (
    capi_loss,
    capi_sinkhorn,
    ibot_patch_loss,
    ibot_plus_plus_patch_loss,
    msn_loss,
    pmsn_loss,
)
from fastssl.spectral import emp_ssl_loss, frossl_loss, mmcr_loss, patch_kernel_alignment_loss, tico_loss
from fastssl.vicregl import vicregl_loss
from fastssl.jepa import lejepa_loss, lewm_loss, sigreg_loss, visreg_loss, visreg_loss_components
from fastssl.swav import sinkhorn, swav_loss
from fastssl.wmse import wmse_loss

__all__ = [
    "barlow_twins_loss",
    "byol_loss",
    "capi_loss",
    "capi_sinkhorn",
    "center_penalty_loss",
    "dcl_loss",
    "dclw_loss",
    "detcon_b_loss",
    "detcon_s_loss",
    "dino_center_update",
    "dino_loss",
    "directclr_loss",
    "emp_ssl_loss",
    "frossl_loss",
    "ibot_patch_loss",
    "ibot_plus_plus_patch_loss",
    "infonce_loss",
    "koleo_loss",
    "lejepa_loss",
    "lewm_loss",
    "macl_loss",
    "mmcr_loss",
    "msn_loss",
    "negative_cosine_similarity",
    "negative_mises_fisher_weights",
    "ntxent_loss",
    "patch_kernel_alignment_loss",
    "pmsn_loss",
    "sigreg_loss",
    "sinkhorn",
    "supcon_loss",
    "swav_loss",
    "tico_loss",
    "vicreg_loss",
    "vicregl_loss",
    "visreg_loss",
    "visreg_loss_components",
    "wmse_loss",
]
