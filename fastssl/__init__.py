"""fastssl: fused kernels for self-supervised learning losses, drop-in for lightly's modules.

>>> from fastssl import NTXentLoss          # instead of: from lightly.loss import NTXentLoss
>>> import fastssl.functional as FS         # the same losses as functions
>>> import fastssl.metrics                  # collapse diagnostics
>>> import fastssl.reference                # textbook formulas, the tests' oracle
"""

from fastssl.contrastive import (
    DCLLoss,
    DCLWLoss,
    DetConBLoss,
    DetConSLoss,
    DirectCLRLoss,
    KoLeoLoss,
    MACLLoss,
    SupConLoss,
)
from fastssl.decorrelation import BarlowTwinsLoss, VICRegLoss
from fastssl.dino import DINOLoss
from fastssl.ntxent import NTXentLoss
from fastssl.predictive import CenterPenaltyLoss, NegativeCosineSimilarity
from fastssl.prototype import CAPILoss, IBOTPatchLoss, IBOTPlusPlusPatchLoss, MSNLoss, PMSNCustomLoss, PMSNLoss
from fastssl.lightly_patch import patch_lightly, unpatch_lightly
from fastssl.swav import SwaVLoss
from fastssl.spectral import EMPSSLLoss, FroSSLLoss, MMCRLoss, PatchKernelAlignmentLoss, TiCoLoss
from fastssl.vicregl import VICRegLLoss
from fastssl.jepa import SIGReg, LeJEPALoss, LeWMLoss, VISRegLoss, VISRegLossComponents
from fastssl.wmse import Whitening2d, WMSELoss

__version__ = "0.1.0"

__all__ = [
    "BarlowTwinsLoss",
    "CAPILoss",
    "CenterPenaltyLoss",
    "DCLLoss",
    "DCLWLoss",
    "DetConBLoss",
    "DetConSLoss",
    "DINOLoss",
    "DirectCLRLoss",
    "EMPSSLLoss",
    "FroSSLLoss",
    "IBOTPatchLoss",
    "IBOTPlusPlusPatchLoss",
    "KoLeoLoss",
    "LeJEPALoss",
    "LeWMLoss",
    "MACLLoss",
    "MMCRLoss",
    "MSNLoss",
    "NegativeCosineSimilarity",
    "NTXentLoss",
    "patch_lightly",
    "PatchKernelAlignmentLoss",
    "PMSNCustomLoss",
    "PMSNLoss",
    "SIGReg",
    "SupConLoss",
    "SwaVLoss",
    "TiCoLoss",
    "unpatch_lightly",
    "VICRegLLoss",
    "VICRegLoss",
    "VISRegLoss",
    "VISRegLossComponents",
    "Whitening2d",
    "WMSELoss",
]
