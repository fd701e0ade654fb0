"""The plan of the paper report: its sections, the claim each one tests, and the experiments they share.

Every section names the experiments it reads (keys of `experiments`); an experiment used by several
sections (the with-`<bos>` scan feeds Table 1, Table 2 and the scale table) runs once per model. The size
of the plan (`PlanSize`) is the only thing `--quick` changes: fewer prompts, shorter texts, fewer probes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..data import Prompt, probe_set
from ..experiments.ablate import Ablate
from ..experiments.base import Experiment
from ..experiments.conditional_heads import TRIGGER_TEXTS, ConditionalHeads
from ..experiments.inputs import prompt_list
from ..experiments.massive import MassiveActivations
from ..experiments.noop import Noop
from ..experiments.oversquash import Oversquash
from ..experiments.passkey import Passkey
from ..experiments.perturb import DEFAULT_SWAP, SHAKESPEARE, Perturb
from ..experiments.rank_collapse import RankCollapse
from ..experiments.repr_collapse import ReprCollapse
from ..experiments.ruler import Ruler
from ..experiments.scan import Scan
from ..experiments.smoothing import AttentionSmoothing
from ..experiments.spread import Spread
from ..experiments.stream import Stream
from .verdicts import DOSES, dose_condition, layer_bands


@dataclass(frozen=True)
class PlanSize:
    """How much of each experiment the plan runs. `FULL` keeps the paper's protocol where it has one
    (Table 1: the whole probe set, first 64 tokens, eps 0.3 and 0.8); `QUICK` fits a few minutes on 2 cores."""

    name: str
    scan_prompts: int | None  # None: every prompt
    explain_prompts: int | None  # smoothing, no-op, rank collapse, massive activations
    max_tokens: int = 64
    ablate_window: int = 1024
    ablate_windows: int = 8
    dose_window: int = 256  # the dose-response and band knock-outs: many conditions, shorter windows
    dose_windows: int = 12
    dose_prompts: int | None = 40  # spread, smoothing and rank collapse under the dose (None: every prompt)
    passkey_lengths: tuple[int, ...] = (1024,)
    passkey_depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    passkey_trials: int = 6
    ruler_tasks: tuple[str, ...] = ("niah_single", "niah_multikey")
    ruler_lengths: tuple[int, ...] = (1024,)
    ruler_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    ruler_trials: int = 5
    repr_lengths: tuple[int, ...] = (16, 32, 64, 128, 256)
    repr_families: tuple[str, ...] = ("repeated", "natural")
    repr_tokens: int = 12  # repeated tokens (one sequence each: the units of the slope)
    oversquash_probes: int = 4
    oversquash_texts: int = 20
    stream_window: int = 64
    stream_length: int = 192
    stream_sinks: tuple[int, ...] = (0, 4)
    stream_full: bool = False
    stream_segments: int = 12
    perturb_text: str = SHAKESPEARE
    perturb_swap: tuple[str, str] = DEFAULT_SWAP
    trigger: str = "'"
    trigger_texts: tuple[str, ...] = tuple(TRIGGER_TEXTS)
    text: str | None = None  # long text for ablate / knock-out / streaming (None: Hamlet)
    lab_preset: str | None = "cpu-paper"  # sweep run when no --lab is given (None: the section is not measured)

    def to_dict(self) -> dict[str, Any]:
        settings = asdict(self)
        settings.pop("perturb_text")
        settings.pop("trigger_texts")
        return settings


# FULL: every verdict on at least 10 independent units, both bundled models in <= 45 minutes on 2 CPU cores
# (`benchmarks/paper_budget.py`). Retrieval runs at 1024 text tokens: the longest length at which 30 prompts per
# condition and task family fit that budget (a 1024-token prefill takes ~2 s on 2 cores).
FULL = PlanSize("full", scan_prompts=None, explain_prompts=60, ablate_window=512, ablate_windows=16)
QUICK = PlanSize("quick", scan_prompts=18, explain_prompts=10, ablate_window=256, ablate_windows=2,
                 dose_window=128, dose_windows=2, dose_prompts=6,
                 passkey_lengths=(384,), passkey_depths=(0.5,), passkey_trials=2,
                 ruler_tasks=("niah_single",), ruler_lengths=(512,), ruler_depths=(0.5,), ruler_trials=2,
                 repr_lengths=(16, 64, 256), repr_families=("repeated",), repr_tokens=2, oversquash_probes=4,
                 oversquash_texts=3, stream_window=48, stream_length=144, stream_sinks=(0, 4), stream_segments=2,
                 lab_preset=None)

REPEAT_TOKENS = (" a", " the", " of", " and", " to", " in", " is", " it", " on", " for", " that", " with", " he",
                 " was")  # one token each in both bundled tokenizers


def one_per_domain(prompts: list[Prompt], n: int | None) -> list[Prompt]:
    """``n`` prompts spread over the domains (round robin), or all of them for None."""
    if n is None or n >= len(prompts):
        return list(prompts)
    by_domain: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        by_domain.setdefault(prompt.domain, []).append(prompt)
    chosen: list[Prompt] = []
    queues = list(by_domain.values())
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen


@dataclass
class Inputs:
    """What the user gave: prompts (default: the built-in probe set)."""

    prompts: list[Prompt] = field(default_factory=probe_set)
    source: str = "built-in probe set"


DOSE_CONDITIONS = tuple(dose_condition(d) for d in DOSES if d < 1.0) + ("add+zero-value",)


def band_conditions(n_layers: int) -> tuple[str, ...]:
    """Knock-out of each third of the layers, each with its random-key control (same layers, same budget), and
    the half dose there (with add and the knock-out: the dose-response per band)."""
    return tuple(c for layers in layer_bands(n_layers).values()
                 for c in (f"add+knockout@{layers}", f"add+random-key@{layers}", f"add+scale:0.5@{layers}"))


def experiments(size: PlanSize, inputs: Inputs, n_layers: int = 0) -> dict[str, Experiment]:
    """Every experiment of the plan, by key, configured for ``size`` (``n_layers``: the model's, for the
    knock-out's layer bands). The loss windows and the smoothing prompts run under every condition the
    claims compare: with and without ⟨bos⟩, the dose add+scale:λ, zero-value, and the band knock-outs."""
    scan_prompts = one_per_domain(inputs.prompts, size.scan_prompts)
    explain = one_per_domain(inputs.prompts, size.explain_prompts)
    dose = one_per_domain(inputs.prompts, size.dose_prompts)  # the prompts measured under the dose as well
    t = size.max_tokens
    text = size.text
    return {
        "scan_add": Scan(prompts=scan_prompts, bos="add", max_tokens=t),
        "scan_strip": Scan(prompts=scan_prompts, bos="strip", max_tokens=t),
        "ablate": Ablate(text=text, bos=("add", "strip"), window=size.ablate_window, max_windows=size.ablate_windows),
        "dose_loss": Ablate(text=text, bos=("add", *DOSE_CONDITIONS, *band_conditions(n_layers)),
                            window=size.dose_window, max_windows=size.dose_windows),
        "passkey": Passkey(lengths=size.passkey_lengths, depths=size.passkey_depths, trials=size.passkey_trials),
        "ruler": Ruler(tasks=size.ruler_tasks, lengths=size.ruler_lengths, depths=size.ruler_depths,
                       trials=size.ruler_trials),
        "perturb": Perturb(text=size.perturb_text, swap=size.perturb_swap),
        "spread": Spread(prompts=dose, bos=("add", "strip", *DOSE_CONDITIONS), max_tokens=t),
        "smoothing": AttentionSmoothing(prompts=dose, bos=("add", "strip", *DOSE_CONDITIONS), max_tokens=t),
        "noop": Noop(prompts=explain, bos=("add",), max_tokens=t),
        "conditional": ConditionalHeads(prompts=prompt_list(list(size.trigger_texts)), trigger=size.trigger),
        "rank_collapse": RankCollapse(prompts=dose, bos=("add", "strip", *DOSE_CONDITIONS), max_tokens=t),
        "repr_collapse": ReprCollapse(lengths=size.repr_lengths, families=size.repr_families, bos=("add", "strip"),
                                      repeat_token=REPEAT_TOKENS[0], repeat_tokens=REPEAT_TOKENS[1:size.repr_tokens]),
        "oversquash": Oversquash(text=size.perturb_text, probes=size.oversquash_probes, max_tokens=t,
                                 texts=tuple(p.text for p in explain[:size.oversquash_texts]), normed=True),
        "massive": MassiveActivations(prompts=explain, bos=("add", "strip"), max_tokens=t),
        "stream": Stream(window=size.stream_window, length=size.stream_length, sinks=size.stream_sinks,
                         full=size.stream_full, segments=size.stream_segments),
    }


@dataclass(frozen=True)
class Section:
    """One section of the report: what the paper claims, and the experiments that test it."""

    key: str
    title: str
    claim: str
    source: str
    uses: tuple[str, ...]  # experiment keys, per model
    cross_model: bool = False  # judged over all models at once (the scale table, the lab)


SECTIONS: tuple[Section, ...] = (
    Section("table1", "Table 1: sink rate per layer × head",
            "LLMs put heavy attention on the first token: most heads are attention sinks (LLaMa 3.1 8B / 70B / "
            "405B: 45.97% / 73.49% / 78.29% of heads at ε = 0.8, 170 prompts, first 64 tokens).",
            "§4.2, Table 1; claim 1", ("scan_add",)),
    Section("scale", "Table 1 across models: scale",
            "Larger, deeper models have stronger sinks (the sink rate at ε = 0.8 rises from 8B to 70B to 405B; "
            "a correlation within one family).", "§4.2, Table 1; prediction 4(c)", ("scan_add",), cross_model=True),
    Section("table2", "Table 2: with vs without ⟨bos⟩ (sink rate and loss)",
            "With ⟨bos⟩ fixed in training, removing it at inference destroys the sink (90.84% → 0.05%) and the "
            "loss jumps (2.69 → 7.56); without a fixed ⟨bos⟩ the sink forms on whatever token comes first "
            "(65.10% vs 65.15%, loss unchanged).", "§5, Table 2; prediction 4(d)",
            ("scan_add", "scan_strip", "ablate")),
    Section("table3", "Table 3: perplexity and retrieval with vs without ⟨bos⟩",
            "Removing the sink (the ⟨bos⟩ token) at inference consistently lowers performance, most of all on "
            "long-context retrieval (Gemma 7B RULER-4K: 82.57 → 0.00).", "§5, Table 3", ("ablate", "passkey", "ruler")),
    Section("fig2", "Fig. 2: perturbation spread",
            "Without ⟨bos⟩ a one-token change of the prompt spreads more strongly across layers and positions "
            "(predicts R = spread without / with ⟨bos⟩ > 1).", "§3.2, Fig. 2; prediction 4(a)", ("perturb", "spread")),
    Section("fig3", "Fig. 3: attention smoothing",
            "Without ⟨bos⟩ the attention maps become smoother (more mixing).", "§3.2, Fig. 3", ("smoothing",)),
    Section("fig4", "Fig. 4: no-op heads and the conditional head",
            "The sink is an approximate no-op: ⟨bos⟩ has the smallest value norm, so a head attending to it "
            "writes almost nothing; heads use it as an if/else default (the apostrophe head attends to the "
            "apostrophe after one, to ⟨bos⟩ otherwise).", "§3.2, Fig. 4; T4", ("noop", "conditional")),
    Section("fig5", "Fig. 5: the pre-training lab (context length)",
            "Models trained on longer contexts develop stronger sinks: nearly none at context 128, rising to "
            "≈35–40% at 2048 (120M models, 5B tokens, constant tokens per step).", "§4.1, Fig. 5; prediction 4(b)",
            (), cross_model=True),
    Section("dose", "Dose-response: the sink turned down, not moved",
            "The causal test the mechanism implies: as the attention on the sink is turned down (add+scale:λ, λ from "
            "1 to 0, every layer), mixing and loss rise monotonically; zeroing what the sink writes (zero-value) "
            "changes little, because the sink is a no-op.", "§3.2 (the no-op mechanism); conditions",
            ("smoothing", "dose_loss")),
    Section("rank", "Rank collapse and representational collapse",
            "Repeated mixing drives token representations towards rank one and makes the last token of a "
            "sequence and of the same sequence with its last token repeated indistinguishable; sinks curb this "
            "mixing.", "§3 (T1, T2); Barbero et al. 2024", ("rank_collapse", "repr_collapse")),
    Section("oversquash", "Over-squashing (Jacobian sensitivity)",
            "Sinks shrink the sensitivity of later tokens to earlier ones (Thm 3.2): removing ⟨bos⟩ raises "
            "‖∂h_j/∂h_i‖.", "§3.1, Thm 3.2; T3", ("oversquash",)),
    Section("massive", "Massive activations",
            "Massive activations (|h| > 100× the median) sit on the starting token and act as a fixed bias that "
            "makes it a sink (Sun et al. 2024, cited as related work).", "§6 related work", ("massive",)),
    Section("knockout", "Sink knock-out, per layer band, against a random key",
            "The sink is functionally needed: removing the attention to position 0 hurts the model more than "
            "removing any one other key (knock-out in every layer is the same computation as stripping ⟨bos⟩ on "
            "RoPE models, so it is judged per third of the layers, against the random-key control).",
            "§5 (removing the sink hurts)", ("dose_loss",)),
    Section("stream", "Streaming (StreamingLLM)",
            "Keeping the first tokens (the sinks) in a sliding-window cache keeps the loss near full attention, "
            "a window alone does not (Xiao et al. 2024, cited).", "§6 related work; StreamingLLM", ("stream",)),
)


def section(key: str) -> Section:
    return next(s for s in SECTIONS if s.key == key)


def sized(size: PlanSize, **changes: Any) -> PlanSize:
    """A copy of a plan size with some settings changed (tests use tiny ones)."""
    return replace(size, **changes)
