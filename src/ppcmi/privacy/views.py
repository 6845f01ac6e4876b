"""What each attacker holds (auditor side): one frozen dataclass per kind of holding, and the threat level each grants.

An attack procedure (:mod:`ppcmi.privacy.procedures`) takes, positionally, exactly the views the suite
(:mod:`ppcmi.privacy.suite`) declares for it, so its signature is its threat model, and its threat label is
derived from those views by :func:`threat_of`. :class:`GroundTruth` and :class:`MembershipTruth` are the
referee's: no attack may declare them.

The views are built from a run folder by :mod:`ppcmi.privacy.run`, the one audit module that reads keys.
Nothing here imports hospital code or key handling (the import contract in ``pyproject.toml`` checks): key
material reaches an attack only inside :class:`StolenKey` or :class:`OtherHospital`, as a transform object
whose methods the attack may call. Latents are dicts ``{scale: (N, C, h, w) array}``; keyed ones are named
``zt``, plain ones ``z``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import numpy as np
import torch

from ..config import MappingTrainConfig
from ..errors import PpcmiError
from ..protocol import LatentBatch
from .inversion import RoundSpec
from .membership import MembershipSplit

# ----------------------------------------------------------------------------- attackers' views


@dataclass(frozen=True)
class ServerView:
    """What the coordinator holds: every hospital's train message exactly as sent, and the shared settings
    that describe them (T1).

    A message's rows are the hospital's ``n`` original slices first, then ``copies - 1`` blocks of ``n``
    augmented copies (row r comes from original r mod n): the layout is public protocol.
    """

    messages: Mapping[str, LatentBatch]  # hospital -> its train message (zt_img_*, zt_msk_*), in the run's order
    scales: tuple[str, ...]              # the latent scales sent, in the messages' order
    copies: int                          # autoencoder.send_copies of the shared configuration
    size: int                            # the shared working image size
    n_classes: int                       # mask classes, background included

    def n_originals(self, hospital: str) -> int:
        return self.messages[hospital].n // self.copies

    def keyed(self, hospital: str, kind: str) -> dict[str, np.ndarray]:
        """``{scale: (N, C, h, w)}`` keyed latents of one hospital's message; ``kind`` "image" or "mask"."""
        return self.messages[hospital].latents({"image": "zt_img_", "mask": "zt_msk_"}[kind])


@dataclass(frozen=True)
class PublicData:
    """Public images and masks of the same modality (T2), and the attacker's own image and mask autoencoders,
    of the public architecture, trained on these only (:func:`ppcmi.privacy.procedures.train_attacker_autoencoders`)."""

    source: str
    images: np.ndarray                       # (N, C, S, S) float32 in [0, 1]
    masks: np.ndarray                        # (N, S, S) int class indices
    autoencoders: Mapping[str, torch.nn.Module]  # "image", "mask"

    @property
    def fg(self) -> np.ndarray:
        """(N, S, S) bool foreground (any class but background)."""
        return self.masks > 0


@dataclass(frozen=True)
class CandidatePool:
    """Images the attacker tries to link the keyed messages to (A7): every hospital's original slices and the
    public slices, in an order only the referee can read (it knows which candidate is which victim slice)."""

    images: np.ndarray  # (M, S, S) float32 in [0, 1]


@dataclass(frozen=True)
class LeakedPairs:
    """Leaked (plain, keyed) pairs of one victim (T3): rows of its train message whose plaintext the attacker
    holds, in leak order (an attack with k pairs uses the first k). The keyed side of each pair is that row of
    the message in :class:`ServerView`; the plain side is the row's image, one-hot mask and plain latents.

    ``targets`` are rows of the same message whose plaintext did not leak, in the order the referee scores
    them: the attacker is asked to reconstruct those.
    """

    victim: str
    rows: np.ndarray                 # (L,) row indices into the victim's train message
    images: np.ndarray               # (L, C, S, S) float32, the rows' images (augmented copies as sent)
    masks: np.ndarray                # (L, K, S, S) float32 one-hot masks
    z_img: dict[str, np.ndarray]     # {scale: (L, C, h, w)} plain latents under the victim's image encoder
    z_msk: dict[str, np.ndarray]     # the same under its mask encoder
    targets: np.ndarray              # (T,) rows to reconstruct; none of them leaked


class KeyedTransform(Protocol):
    """What an attack may do with a hospital's keyed transform (:class:`ppcmi.klt.KeyedLatentTransform`)."""

    def inverse(self, zt: dict[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]: ...

    def matrix(self, modality: str, scale: str) -> torch.Tensor: ...

    def bias(self, modality: str, scale: str) -> torch.Tensor: ...


def _tensors(z: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {s: torch.from_numpy(np.asarray(a, np.float32)) for s, a in z.items()}


@dataclass(frozen=True)
class SiteKit:
    """One hospital's autoencoders and keyed transform (``None`` where the run sent latents in the clear)."""

    site: str
    autoencoders: Mapping[str, torch.nn.Module]  # "image", "mask"
    transform: KeyedTransform | None

    @torch.inference_mode()
    def encode_plain(self, x: np.ndarray, kind: str) -> dict[str, np.ndarray]:
        """Plain latents of images (N, C, S, S) (kind "image") or one-hot masks (N, K, S, S) (kind "mask")."""
        return {s: v.float().numpy() for s, v in self.autoencoders[kind].encode(torch.as_tensor(x).float()).items()}

    @torch.inference_mode()
    def decode_plain(self, z: Mapping[str, np.ndarray], kind: str) -> np.ndarray:
        """Decode plain latents: (N, C, S, S) sigmoid outputs."""
        return self.autoencoders[kind].decode(_tensors(z)).float().numpy()

    @torch.inference_mode()
    def decode_keyed(self, zt: Mapping[str, np.ndarray], kind: str) -> np.ndarray:
        """Invert this hospital's transform, then decode with its decoder: (N, C, S, S) sigmoid outputs."""
        t = _tensors(zt)
        z = self.transform.inverse(t, kind) if self.transform is not None else t
        return self.autoencoders[kind].decode(z).float().numpy()

    def true_key(self, kind: str, scale: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(M, b) of the transform (zt = M z + b), float64; None without a transform."""
        if self.transform is None:
            return None
        return self.transform.matrix(kind, scale).double().numpy(), self.transform.bias(kind, scale).double().numpy()


@dataclass(frozen=True)
class VictimDecoder:
    """The victim's image and mask decoders, without its key: a stolen model, not a stolen key."""

    victim: str
    kit: SiteKit  # only its decode_plain is the attacker's; its transform is None

    def decode(self, z: Mapping[str, np.ndarray], kind: str) -> np.ndarray:
        return self.kit.decode_plain(z, kind)


@dataclass(frozen=True)
class StolenKey:
    """The victim's key, as its keyed transform, and its autoencoders (T4)."""

    victim: str
    kit: SiteKit  # kit.site == victim


@dataclass(frozen=True)
class OtherHospital:
    """Another hospital's key and autoencoders, handed to the server by that hospital (collusion)."""

    victim: str
    kit: SiteKit  # kit.site != victim


@dataclass(frozen=True)
class CoreUpdates:
    """What a curious coordinator sees of one round of the federated core (``mapping.scope = "federated"``, T1): the
    global core it sent, each hospital's round settings (public or crossed: row count, learning rate, local epochs,
    batch size; the fit seed, granted as the worst case) and the update, the returned core minus the global one.

    ``secure = False``: ``updates`` holds one update per hospital, as a coordinator would see them without SecAgg+
    (the worst case). ``secure = True``: it holds only ``"sum"``, the FedAvg average ``sum_i n_i update_i / sum_i n_i``,
    which is all SecAgg+ lets the coordinator see."""

    global_core: Mapping[str, np.ndarray]
    updates: Mapping[str, Mapping[str, np.ndarray]]
    specs: Mapping[str, RoundSpec]
    secure: bool

    def __post_init__(self) -> None:
        if not self.specs:
            raise PpcmiError("core updates: specs names no hospital")
        if self.secure and set(self.updates) != {"sum"}:
            raise PpcmiError(f"core updates: with SecAgg+ the coordinator holds only the sum, got updates {sorted(self.updates)}")
        if not self.secure and (not self.updates or not set(self.updates) <= set(self.specs)):
            raise PpcmiError(f"core updates: per-hospital updates {sorted(self.updates)} must name hospitals of specs {sorted(self.specs)}")


@dataclass(frozen=True)
class VictimFrames:
    """One hospital's canonical frames ``{scale: (U, mu)}`` (its mapping network's fixed input and output frames, which
    never leave it: ``SITE/fedcore/own.safetensors``). With :class:`StolenKey`, the holding of A9's positive control."""

    victim: str
    image: Mapping[str, tuple[np.ndarray, np.ndarray]]
    mask: Mapping[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class TargetModel:
    """The mapping network under a membership attack (T5: its weights or query access), and the public recipe
    it was trained by (for the attacker's reference networks)."""

    load: Callable[[str], torch.nn.Module]  # hospital -> the network that maps its rows (shared scope: one for all)
    config: MappingTrainConfig


@dataclass(frozen=True)
class ChallengePart:
    """Records of one hospital, keyed by it, as rows of a ``train`` message."""

    hospital: str
    batch: LatentBatch
    units: tuple[str, ...]  # per row, an opaque id of its source slice (a slice and its augmented copies share it)


@dataclass(frozen=True)
class MembershipChallenge:
    """The records whose membership the attacker is asked about (T5), and the population its reference networks
    are trained on. Which records are members is the referee's (:class:`MembershipTruth`); the order of the
    parts and of the unit ids is the referee's construction, kept so that the attack draws what it drew before
    the audit was split into views; no attack reads it."""

    parts: tuple[ChallengePart, ...]

    @property
    def units(self) -> list[str]:
        return [u for p in self.parts for u in p.units]


# ----------------------------------------------------------------------------- the referee's


@dataclass(frozen=True)
class GroundTruth:
    """What only the referee holds about one victim: its slices and masks, and the plain latents of every row it
    sent. Used to score estimates and to build positive controls; never given to an attack."""

    victim: str
    images: np.ndarray             # (n, S, S) original slices
    fg: np.ndarray                 # (n, S, S) bool foreground
    groups: np.ndarray             # (n,) patient of each slice
    inputs: np.ndarray             # (N, C, S, S) the image behind each sent row
    onehot: np.ndarray             # (N, K, S, S) its one-hot mask
    src: np.ndarray                # (N,) the original slice of each row
    z_img: dict[str, np.ndarray]   # {scale: (N, C, h, w)} plain image latents of every row
    z_msk: dict[str, np.ndarray]


@dataclass(frozen=True)
class MembershipTruth:
    """The referee's side of a :class:`MembershipChallenge`: which records are members, and the split behind it."""

    member: np.ndarray                     # (n_records,) bool, in the challenge's order
    member_rows: Mapping[str, np.ndarray]  # hospital -> the rows of its train message the network was fitted on
    member_units: Mapping[str, Mapping[int, str]]  # hospital -> message row -> its unit id in the challenge
    split: MembershipSplit
    n_validation_rows: int


# ----------------------------------------------------------------------------- threat labels, derived

GRANTS: dict[type, tuple[str | None, str | None]] = {
    # view -> (the threat level of DESIGN.md section 4 that holds it, what the label adds where no level does)
    ServerView: ("T1", None),
    PublicData: ("T2", None),
    CandidatePool: ("T2", "candidate images that include the victims' own slices"),
    LeakedPairs: ("T3", None),
    StolenKey: ("T4", None),
    VictimDecoder: (None, "the victim's decoder"),
    OtherHospital: (None, "another hospital's key and decoder (collusion)"),
    TargetModel: ("T5", None),
    CoreUpdates: ("T1", "the federated core's round updates"),
    VictimFrames: (None, "the victim's mapping frames (kept at the hospital)"),
    MembershipChallenge: ("T5", None),
}


@dataclass(frozen=True)
class Threat:
    """An attack's threat label: the highest level among its views, plus what no level holds."""

    level: str
    extras: tuple[str, ...] = ()
    eavesdropper: bool = False  # True when the attack needs nothing but the messages: T0 without TLS sees them too

    @property
    def levels(self) -> tuple[str, ...]:
        """The ``--threats`` levels that select the attack."""
        return ("T0", self.level) if self.eavesdropper else (self.level,)

    @property
    def label(self) -> str:
        return " + ".join((self.level, *self.extras))


def threat_of(needs: tuple[type, ...]) -> Threat:
    """The threat label that follows from the views an attack declares (levels T1 < T2 < T3 < T4 < T5)."""
    unknown = [v.__name__ for v in needs if v not in GRANTS]
    if unknown:
        raise PpcmiError(f"views {unknown}: not an attacker's holding (the referee's views are never an attack's)")
    levels = [GRANTS[v][0] for v in needs if GRANTS[v][0]]
    if not levels:
        raise PpcmiError(f"views {[v.__name__ for v in needs]}: none of them is held at any threat level")
    extras = tuple(GRANTS[v][1] for v in needs if GRANTS[v][1])
    return Threat(max(levels), extras, eavesdropper=tuple(needs) == (ServerView,))


__all__ = ["ServerView", "PublicData", "CandidatePool", "LeakedPairs", "SiteKit", "VictimDecoder", "StolenKey",
           "OtherHospital", "CoreUpdates", "VictimFrames", "TargetModel", "ChallengePart", "MembershipChallenge", "GroundTruth",
           "MembershipTruth",
           "GRANTS", "Threat", "threat_of"]
