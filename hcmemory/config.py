"""HCConfig: every knob of the KV state in one validated dataclass, plus named presets.

Validation happens at construction so that a typo fails where it is made, not deep inside a
forward pass; each error names the field and the values it accepts.  ``CHOICES`` is the one list
of allowed values per field, and ``coerce_config`` the one way any API turns what a user passed
(preset name, ``HCConfig``, dict) into a config.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CHOICES: dict[str, tuple] = {
    "key_codec": ("none", "vq", "int8", "int4", "int3", "int2"),
    "vq_subvector_dim": (1, 2, 4, 8),
    "vq_codebook": ("layer", "head", "group"),
    "calibration": ("shipped", "context"),
    "rescore_keys": ("fp16", "int8", "int4", "int3", "int2", "none"),
    "value_codec": ("none", "fp16", "bf16", "int8", "int4", "int3", "int2"),
    "value_placement": ("host", "device"),
    "eviction": ("none", "hc", "mean", "h2o", "streaming", "window"),
    "selection_aggregate": ("mean", "max", "union"),
    "selection_scores": ("codes", "exact"),
    "kernel": ("auto", "torch", "triton", "cpp"),
}
"""Allowed values of every field that takes one of a fixed set."""


def _fail(name: str, value: Any, expected: str) -> None:
    raise ValueError(f"HCConfig.{name}={value!r} is not valid; {expected}")


def is_int(value: Any) -> bool:
    """An int that is not a bool (``True`` is an ``int`` to Python, never a count to hcmemory)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class HCConfig:
    """How one conversation's KV state is stored, attended and bounded.

    The defaults are the identity configuration (``full``): full-precision keys and values next
    to the model, nothing selected away, nothing evicted — bit-for-bit what transformers' own
    cache computes, so every compressing preset can be measured against it.
    """

    # --- keys next to the model -------------------------------------------------------------
    key_codec: str = "none"
    """``none`` (full precision), ``vq`` (codebook indices, the paper's method), ``int8/4/2`` (uniform)."""
    vq_subvector_dim: int = 4
    """Dimensions per VQ sub-vector: 2 → codes take 50 % of fp16 keys, 4 → 25 %."""
    vq_centroids: int = 4096
    """Codebook size; ≤ 256 stores 8-bit codes, otherwise 16-bit."""
    vq_codebook: str = "layer"
    """Codebook sharing: one per ``layer``, per ``head`` (layer × KV head) or per ``group`` of dimensions."""
    calibration: str = "shipped"
    """Where key codecs are fitted: on the ``shipped`` calibration text (once per model, cached on
    disk), or on the ``context``'s own committed keys once ``calibration_tokens`` have arrived."""
    calibration_tokens: int = 1024
    """With ``calibration="context"``: committed tokens a layer waits for before fitting (until
    then its keys stay exact).  Fitting on a 2-token append tripled the key error for good."""
    kmeans_iters: int = 12

    # --- host side: exact re-scoring and values ---------------------------------------------
    rescore: bool = True
    """Approximate scores only select rows; selected rows are re-scored exactly on the host.
    ``False`` is the paper's way (approximate weights used directly, no exact key copy at all,
    so sinks and the recent window keep exact values but coded keys), kept for comparison."""
    rescore_keys: str = "fp16"
    """Precision of the host copy of keys used for re-scoring: ``fp16``, channel-normalised ``int8/4/2``,
    or ``none`` (the model's dtype, which makes top_p=1 re-scoring bit-for-bit full attention)."""
    rescore_residual: bool = False
    """The host key copy holds what the codes miss (``key − decode(codes)``) instead of the key, and
    re-scoring adds the two: the same bytes then refine the codes rather than repeat them.  With
    4-dim VQ codes the residual of SmolLM2's keys is small, so int4 residuals err 7× less than
    int4 keys (squared error 0.00049 vs 0.0033 of the keys' energy, 4K multikey text)."""
    residual_symmetric: bool = False
    """With ``rescore_residual``: int residual rows keep only a step per group, levels centred on zero.
    The channel-normalised residual is centred, so a per-row minimum is 2 bytes a group spent on nothing."""
    value_codec: str = "none"
    """How values are stored: ``none`` (model dtype), ``fp16``, ``bf16``, ``int8/4/2`` (per token)."""
    quant_group_size: int = 32
    """Channels per quantization group of every ``int8/4/3/2`` codec (keys, re-scoring keys, values); each
    group stores 4 bytes of min/step (a symmetric residual only the 2-byte step).  On a 64-dim head,
    int4 rows take 40 B with groups of 32 and 36 B with one group of 64 (``compact``: 38 % → 35 % of an
    fp16 cache in total, the same answers on the eval).  A head with fewer channels is one group; otherwise it must divide the head dimension."""
    quant_rotation: bool = False
    """Every ``int8/4/3/2`` row (keys, re-scoring keys, values) is quantized in a fixed orthogonal basis
    (Hadamard with random signs), where its large channels no longer set the whole group's range;
    dot products and weighted sums come out the same.  SmolLM2 int4 values: attention output error
    0.078 → 0.050 (2K and 4K eval text).  The signs are drawn from a generator seeded with the head
    size, so every codec of a head size agrees; drawing them differently is a checkpoint format change."""
    value_placement: str = "device"
    """``host`` (CPU memory, where the weighted sum runs) or ``device`` (next to the model)."""

    # --- what attention reads each step -----------------------------------------------------
    top_p: float = 1.0
    """Per step, read the smallest set of compressed rows whose approximate mass reaches top_p."""
    selection_queries: int = 32
    """Steps with more queries than this are prefill steps (``prefill_top_p`` applies); a prefill block
    that selects chooses its rows from this many of its queries, evenly spaced: scoring all 1,024
    queries of a chunk against every code costs more than the exact attention it saves (SmolLM2,
    7.5K: 32 → 0.95x DynamicCache prefill, 128 → 0.55x, all → 0.4x)."""
    prefill_top_p: float | None = None
    """``top_p`` for steps of more than ``selection_queries`` queries (document prefill); None: ``top_p``.
    1.0 reads every compressed row exactly while prefilling and selects only for questions and decoding."""
    selection_aggregate: str = "mean"
    """How the queries of a step (a KV head's query group, a block's tokens) choose together: top-p of
    their ``mean`` distribution, of the per-row ``max``, or the ``union`` of each query's own top-p set."""
    min_selected: int = 0
    """Read at least this many compressed rows per step and head, whatever top-p says."""
    selection_scores: str = "codes"
    """What selects: the approximate ``codes`` (the method), or ``exact`` keys — an oracle that reads
    every exact key, for measuring how much selection loses to the codes' error alone."""
    sink_tokens: int = 4
    recent_tokens: int = 64
    """First ``sink_tokens`` and last ``recent_tokens`` rows are always read exactly and never evicted."""
    full_precision_window: bool = False
    """Keep 16-bit copies of the rows read exactly (sinks, recent window, the chunk), so int values and
    int re-scoring keys do not reach them: what KIVI and quanto's residual window do (``compact``'s NLL
    gap to full attention 0.036 → 0.010 on the eval grid).  Costs
    ``sink_tokens + recent_tokens`` rows per layer (the model's dtype, float16 for a float32 model),
    beside the values."""

    # --- what is kept at all ----------------------------------------------------------------
    eviction: str = "none"
    budget: int | float | None = None
    """Most rows kept per layer: an int, or a float in (0, 1] as a fraction of tokens seen."""

    # --- feeding ----------------------------------------------------------------------------
    kernel: str = "auto"
    """Which implementation scores codes and selects rows: ``auto`` (Triton on CUDA, the C++ kernels on
    the CPU where they build, torch elsewhere), or forced: ``torch`` (the reference), ``cpp`` or
    ``triton`` (on the CPU only under ``TRITON_INTERPRET=1``, for tests)."""
    chunk_size: int = 1024
    """Tokens a prefill step feeds at once; it bounds the 16-bit memory a step needs (the chunk's
    activations, keys and values).  Each chunk reads the earlier chunks through their compressed rows,
    which one chunk of the whole document would read at 16 bits — but measured, that costs ``compact``
    nothing: prefilling each grid document as one chunk instead of 1,024-token chunks changed its NLL
    gap per answer token by +0.002 [-0.000, +0.004] and its accuracy by +0.4 [-3.3, +4.7] points
    (102 eval questions, 2K-7.5K; a 6K held-out screen of 9 questions had suggested 0.021 → 0.013 on
    multikey).  The ``kivi-*`` presets prefill 8,192 tokens a step: KIVI's own prefill is one
    full-precision pass, and a peer is compared in its own regime."""
    store_growth: int = 256
    """Row buffers grow by at least this many rows (amortized, never whole-cache copies per step)."""

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or value not in allowed:  # True == 1 would pass `in (1, 2, 4, 8)`
                _fail(name, value, f"allowed values: {', '.join(map(repr, allowed))}")
        ints = {"vq_centroids": (2, 65536), "kmeans_iters": (1, None), "selection_queries": (1, None),
                "sink_tokens": (0, None), "recent_tokens": (0, None), "chunk_size": (1, None),
                "store_growth": (1, None), "calibration_tokens": (1, None), "min_selected": (0, None),
                "quant_group_size": (1, None)}
        for name, (low, high) in ints.items():
            value = getattr(self, name)
            if not is_int(value) or value < low or (high is not None and value > high):
                _fail(name, value, f"expected an int in [{low}, {high}]" if high else f"expected an int >= {low}")
        for name in ("rescore", "rescore_residual", "residual_symmetric", "quant_rotation", "full_precision_window"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "expected True or False")
        if self.rescore_residual and not (self.rescore and self.compressed_keys):
            _fail("rescore_residual", True, "a residual refines compressed key codes for re-scoring; it needs "
                  "rescore=True and a key_codec other than 'none'")
        if self.residual_symmetric and not (self.rescore_residual and self.rescore_keys.startswith("int")):
            _fail("residual_symmetric", True, "it centres int residual rows; it needs rescore_residual=True and "
                  "an int rescore_keys")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            _fail("top_p", self.top_p, "expected a float in (0, 1]")
        if self.prefill_top_p is not None and (not _is_number(self.prefill_top_p) or not 0.0 < self.prefill_top_p <= 1.0):
            _fail("prefill_top_p", self.prefill_top_p, "expected None or a float in (0, 1]")
        self._check_budget()

    def _check_budget(self) -> None:
        budget = self.budget
        protected = self.sink_tokens + self.recent_tokens
        if budget is not None:
            if not _is_number(budget):
                _fail("budget", budget, "expected None, an int of rows, or a float fraction in (0, 1]")
            if isinstance(budget, int) and budget <= protected:
                _fail("budget", budget, f"expected more rows than sink_tokens + recent_tokens ({protected})")
            if isinstance(budget, float) and not 0.0 < budget <= 1.0:
                _fail("budget", budget, "expected a float fraction in (0, 1]")
        if (self.eviction == "none") != (budget is None):
            raise ValueError(
                f"HCConfig.budget={budget!r} with eviction={self.eviction!r}: a budget needs an eviction policy "
                f"({', '.join(map(repr, CHOICES['eviction'][1:]))}) and a policy needs a budget; set both or neither"
            )

    # ------------------------------------------------------------------------------------------
    @property
    def compressed_keys(self) -> bool:
        """True when keys outside the exact window are held as approximate codes."""
        return self.key_codec != "none"

    def replace(self, **changes: Any) -> "HCConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, complete: bool = False) -> "HCConfig":
        """A config from field values; ``complete=True`` (checkpoints) requires every field, so a
        stored config is never silently completed with today's defaults."""
        if not isinstance(data, Mapping):
            raise TypeError(f"HCConfig.from_dict takes a dict of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"HCConfig has no field(s) {unknown}; known fields: {sorted(known)}")
        missing = sorted(known - set(data))
        if complete and missing:
            raise ValueError(f"the stored HCConfig lacks field(s) {missing}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "HCConfig":
        """A named configuration; keyword overrides are applied (and validated) on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown HCConfig preset {name!r}; available presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_spec(cls, spec: str) -> "HCConfig":
        """``preset`` or ``preset:field=value,...`` (values as JSON where they parse, else strings): the
        command-line form the benchmarks and ``hcmemory eval`` take."""
        name, overrides = parse_spec(spec)
        return cls.preset(name, **overrides)

    @staticmethod
    def presets() -> list[str]:
        return list(PRESETS)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``preset:field=value,...`` split into the preset's name and its overrides (values as JSON where
    they parse, else strings), unvalidated: what ``HCConfig.from_spec`` builds and the eval report
    classifies."""
    name, _, fields = spec.partition(":")
    overrides = {}
    for item in filter(None, fields.split(",")):
        key, _, raw = item.partition("=")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return name, overrides


ADDED_FIELDS: dict[str, Any] = {"rescore_residual": False, "quant_group_size": 32, "residual_symmetric": False,
                                "quant_rotation": False, "full_precision_window": False}
"""Fields added after configs were first stored (checkpoints, cached eval cells), each with the value
that reproduces what a stored config written without it ran."""


def with_added_fields(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config's fields, completed with the ``ADDED_FIELDS`` it predates (and nothing else)."""
    return {**{name: value for name, value in ADDED_FIELDS.items() if name not in stored}, **stored}


def coerce_config(config: "HCConfig | str | Mapping[str, Any] | None") -> HCConfig:
    """What every public API accepts as ``config``: a preset name, an ``HCConfig``, a dict of its
    fields, or None (the ``full`` preset)."""
    if config is None:
        return HCConfig()
    if isinstance(config, HCConfig):
        return config
    if isinstance(config, str):
        return HCConfig.preset(config)
    if isinstance(config, Mapping):
        return HCConfig.from_dict(config)
    raise TypeError(f"config must be a preset name ({', '.join(PRESETS)}), an HCConfig or a dict of HCConfig "
                    f"fields, not {type(config).__name__}")


_HC = dict(key_codec="vq", vq_centroids=256, vq_codebook="head", value_placement="host", value_codec="fp16",
           rescore=True, top_p=0.9, prefill_top_p=1.0)
# prefill_top_p=1.0: a document's prefill reads every row exactly and selection starts with the
# questions: selecting during prefill lost the rows a later question needs, which were never attended
# into the document's own hidden states.  256 centroids on 2-dim sub-vectors take the paper's 12.5 %
# bytes with 8-bit codes and reconstruct SmolLM2's keys better than 4,096 on 4-dim ones.  The
# measurements behind both: docs/DESIGN-NOTES.md ("Why the presets are what they are").

PRESETS: dict[str, dict[str, Any]] = {
    # identity: what transformers' DynamicCache computes
    "full": {},
    # the paper's budgets: values on host, keys as VQ codes next to the model
    "hc-25": {**_HC, "vq_subvector_dim": 1},
    "hc-12.5": {**_HC, "vq_subvector_dim": 2},
    "hc-12.5-bounded": {**_HC, "vq_subvector_dim": 2, "eviction": "mean", "budget": 4096},
    # everything kept at 35-38 % of an fp16 cache in total: 4-dim sub-vector codes next to the model
    # (6.5 %) plus int4 residuals of the keys (what the codes miss) give the keys every step scores,
    # int4 values sit on the host (one group of 64 channels per row), and the rows read exactly (sinks,
    # the last 64 rows, the chunk) keep 16-bit copies.  top_p=1.0: every row is scored, none selected
    # away.  On text people wrote, selecting by 4-dim codes at top-p 0.9 dropped rows a copied number
    # needed (exact keys or exact values did not bring the answer back, reading every row did); on a
    # held-out draw it kept 68 % of full attention's answers word for word instead of 41 % — short of
    # 90 %.  Every layout tried below these bytes lost (docs/DESIGN-NOTES.md).
    "compact": {**_HC, "vq_subvector_dim": 4, "rescore_keys": "int4", "rescore_residual": True,
                "value_codec": "int4", "quant_group_size": 64, "full_precision_window": True, "top_p": 1.0},
    # classic policies in the same frame
    "streaming": {"eviction": "streaming", "budget": 1024},
    "h2o": {"eviction": "h2o", "budget": 0.25},
    # KIVI: int keys scored directly and int values, with its newest tokens (here the sinks, the last 64
    # rows and the chunk being prefilled) in full precision.  Keys are quantized per token after a
    # per-channel normalisation, not in KIVI's per-channel groups along the tokens.  A document is
    # prefilled 8,192 tokens a step (one step on the eval's documents), as KIVI's prefill is one pass.
    "kivi-4": {"key_codec": "int4", "value_codec": "int4", "rescore": False, "full_precision_window": True,
               "chunk_size": 8192},
    "kivi-2": {"key_codec": "int2", "value_codec": "int2", "rescore": False, "full_precision_window": True,
               "chunk_size": 8192},
}
